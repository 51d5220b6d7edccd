"""The memory-lean (stashed) backward under DistributedDataParallel: 2 CPU processes (gloo), with
Detectron2's DDP settings (find_unused_parameters=False): the synchronised gradients equal the mean
of the all-in-graph gradients of the two processes' batches (with the DDP loss normalisation)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.helpers import NO_RAP, jiggled, synthetic_batch, tiny_model

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = jiggled(tiny_model(*NO_RAP))
        ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=False)
        for _ in range(2):  # a second iteration: DDP's reducer must be ready again
            ddp.zero_grad(set_to_none=True)
            sum(ddp(synthetic_batch(seed=rank)).values()).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_the_mean_of_the_plain_gradients(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    ddp_grads = torch.load(out)
    plain = jiggled(tiny_model(*NO_RAP, "MODEL.DEQDET.GRAD_STASH", "False"))
    # Under DDP the criterion normalises by the ground-truth count averaged over the processes.
    counts = [sum(len(x["instances"]) for x in synthetic_batch(seed=rank)) for rank in range(2)]
    expected = {}
    for rank in range(2):
        plain.zero_grad(set_to_none=True)
        sum(plain(synthetic_batch(seed=rank)).values()).backward()
        for n, p in plain.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / 2 * counts[rank] / (sum(counts) / 2)
    for name, g in expected.items():
        scale = g.abs().max().clamp(min=1e-8)
        assert (ddp_grads[name] - g).abs().max() <= 1e-4 * scale, name
