"""Crash and resume: a training killed (SIGKILL, also in the middle of writing a checkpoint) and
resumed with ``--resume`` ends with exactly the weights of an uninterrupted run (CPU, fixed seed;
same model, optimizer, scheduler, iteration, data order and random draws: equality, no tolerance,
except the stated 2e-5 of the ATSS + DyHead case)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase

from deqdet.engine import Trainer
from tests.helpers import ATSS_DYHEAD, DENSE_QUERY, DEQ, ROOT, final_weights, subprocess_env, train_main

pytestmark = pytest.mark.slow

LAUNCHER = os.path.join(ROOT, "tests", "engine", "train_net_with_faults.py")


def _killed_run(argv, **faults):
    env = subprocess_env(**{f"FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    proc = subprocess.run([sys.executable, LAUNCHER, *argv], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=atol, msg=name)


def _last_checkpoint(folder):
    with open(os.path.join(folder, "last_checkpoint")) as f:
        return f.read().strip()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use the one thread the killed subprocesses use: float sums in another thread
    count come out in another order, and after a few AdamW steps the weights would differ."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")  # as a fresh process (earlier tests may set "high")
    yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    """Uninterrupted 6-iteration runs, by name."""
    runs = {}
    for name, argv in (("deq", DEQ), ("atss_dyhead", ATSS_DYHEAD), ("dense_query", DENSE_QUERY)):
        out = str(tmp_path_factory.mktemp(f"straight_{name}"))
        train_main([*argv, "OUTPUT_DIR", out])
        runs[name] = final_weights(out)
    return runs


def test_kill_while_writing_a_checkpoint_then_resume_deq(straight, tmp_path):
    out = str(tmp_path)
    _killed_run([*DEQ, "OUTPUT_DIR", out], kill_saving="model_0000003")
    # Killed half-way through writing the checkpoint of iteration 3: the half-written file never
    # took the checkpoint's name and last_checkpoint still names the previous complete one.
    assert os.path.isfile(os.path.join(out, ".model_0000003.incomplete.pth"))
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))
    assert _last_checkpoint(out) == "model_0000001.pth"
    torch.load(os.path.join(out, "model_0000001.pth"), weights_only=False)  # complete and readable

    train_main(["--resume", *DEQ, "OUTPUT_DIR", out])  # resumes at iteration 2
    assert _last_checkpoint(out) == "model_final.pth"
    _assert_same_weights(final_weights(out), straight["deq"])


def test_kill_between_checkpoints_then_resume_atss_dyhead(straight, tmp_path):
    out = str(tmp_path)
    _killed_run([*ATSS_DYHEAD, "OUTPUT_DIR", out], kill_after_iter=4)
    assert _last_checkpoint(out) == "model_0000003.pth"
    train_main(["--resume", *ATSS_DYHEAD, "OUTPUT_DIR", out])  # resumes at iteration 4
    # Alone this is exact; after the rest of the suite in the same pytest process the in-process runs
    # differ from the fresh killed process by up to 6.2e-6 (measured; process-global state left by
    # earlier tests, not identified). The faults this guards against move weights by 4e-5 and more
    # (a different thread count: 3.9e-5; a restarted data stream or RNG: larger).
    _assert_same_weights(final_weights(out), straight["atss_dyhead"], atol=2e-5)


class _CrashAfter(HookBase):
    def after_step(self):
        if self.trainer.iter == 2:
            raise RuntimeError("simulated crash")


def test_crash_then_resume_dense_query_detector(straight, tmp_path, monkeypatch):
    """An in-process crash after iteration 2 (a deterministic stop; the checkpoint of iteration 1 is
    the last one), then --resume."""
    out = str(tmp_path)
    build_hooks = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: build_hooks(self) + [_CrashAfter()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_main([*DENSE_QUERY, "OUTPUT_DIR", out])
    monkeypatch.setattr(Trainer, "build_hooks", build_hooks)
    assert _last_checkpoint(out) == "model_0000001.pth"
    train_main(["--resume", *DENSE_QUERY, "OUTPUT_DIR", out])
    _assert_same_weights(final_weights(out), straight["dense_query"])


def test_resume_restores_the_deq_loss_scale(tmp_path):
    """The stash's observed loss scale (the AMP scale of the previous backward) is part of the
    trainer's checkpointed state."""
    from deqdet.engine import build_config

    cfg = build_config(DEQ[1], [*DEQ[2:], "OUTPUT_DIR", str(tmp_path)])
    first = Trainer(cfg)
    first.model.decoder.loss_scale.value = 1024.0
    first.iter = 1
    first.checkpointer.save("model_0000001")
    second = Trainer(cfg)
    assert second.model.decoder.loss_scale.value == 1.0
    second.resume_or_load(resume=True)
    assert second.model.decoder.loss_scale.value == 1024.0
    assert second.start_iter == 2 and second.data_loader.sampler.start == 2 * cfg.SOLVER.IMS_PER_BATCH
