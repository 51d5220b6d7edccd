"""Multi-process training through ``train_net.py --num-gpus 2`` on a CPU-only machine (Detectron2's
``launch`` picks gloo there): two processes with batch 2 each end where one process with batch 4
does, for ATSS + DyHead and DEQDet.

Made comparable: images of one size (batches pad alike), no random flip and no RAP noise (each
process draws its own random numbers), frozen BatchNorm (batch statistics depend on the split).
Losses normalised by counts (ATSS: positives, centerness sum; set criterion: boxes) use the count
averaged over processes, which makes the averaged gradients those of the whole batch.

Tolerance: 1e-4 of each weight tensor's largest magnitude after 3 AdamW steps (measured on a 2-core
CPU: 1.1e-5 for ATSS + DyHead, 8e-6 for DEQDet; the gradients are summed in another order, and Adam
divides small gradients by their own size). Excluded: the key bias of the decoder's
attention (the middle third of ``in_proj_bias``), whose true gradient is zero (softmax ignores it):
its gradient is rounding noise, which Adam scales up to steps of the learning rate's size."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import (
    ATSS_DYHEAD,
    DEQ,
    FIXED_SIZE_DATASET,
    NO_RAP,
    ROOT,
    final_weights,
    register_fixed_size_dataset,
    subprocess_env,
    train_main,
)

# The module (the package exports the function of the same name).
d2_launch = importlib.import_module("detectron2.engine.launch")
COMPARABLE = [
    "DATASETS.TRAIN", f"('{FIXED_SIZE_DATASET}',)", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.RANDOM_FLIP", "none", "MODEL.RESNETS.NORM", "FrozenBN",
]


@pytest.mark.slow
@pytest.mark.parametrize("name, argv", [("atss_dyhead", ATSS_DYHEAD), ("deq", [*DEQ, *NO_RAP])])
def test_two_processes_match_one_with_the_whole_batch(name, argv, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    register_fixed_size_dataset(str(data))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_main([*argv, *COMPARABLE, "OUTPUT_DIR", one])

    # CPU processes on a GPU machine too (Detectron2's launch would want one GPU per process there).
    env = subprocess_env(FAULT_FIXED_SIZE_DATA=str(data), CUDA_VISIBLE_DEVICES="")
    launcher = os.path.join(ROOT, "tests", "engine", "train_net_with_faults.py")
    proc = subprocess.run(
        [sys.executable, launcher, "--num-gpus", "2", "--dist-url", "auto", *argv, *COMPARABLE,
         "OUTPUT_DIR", two],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(one), final_weights(two)
    assert a.keys() == b.keys()
    for k in [k for k in a if k.endswith("attention.in_proj_bias")]:
        a[k], b[k] = (x.view(3, -1)[[0, 2]] for x in (a[k], b[k]))
    worst = max(
        ((a[k] - b[k]).abs().max() / (1e-3 + a[k].abs().max())).item() for k in a if a[k].is_floating_point()
    )
    print(f"{name}: largest weight difference relative to the tensor's scale: {worst:.2e}")
    assert worst < 1e-4


def test_cpu_launch_uses_gloo_and_no_cuda_device(monkeypatch, tmp_path):
    """Detectron2's worker set-up on a machine without CUDA: gloo, and no torch.cuda.set_device."""
    backends = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("torch.cuda.set_device called"))
    monkeypatch.setattr(d2_launch.dist, "init_process_group", lambda backend, **kw: backends.append(backend))
    monkeypatch.setattr(d2_launch.comm, "create_local_process_group", lambda n: None)
    monkeypatch.setattr(d2_launch.comm, "synchronize", lambda: None)
    d2_launch._distributed_worker(0, lambda: None, 2, 2, 0, f"file://{tmp_path}/rendezvous", ())
    assert [b.lower() for b in backends] == ["gloo"]
