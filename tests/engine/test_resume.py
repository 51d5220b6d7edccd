"""Crash and resume as a user does it: ``train_net.py`` with a shipped config in a process of its
own, killed with SIGKILL (after a checkpoint, or in the middle of writing one), then run again with
``--resume``, ends with exactly the weights of an uninterrupted run (CPU, fixed seed; equality, no
tolerance), with the config's own data loader settings (workers, aspect-ratio grouping,
augmentation)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deqdet.engine import Trainer, build_config
from deqdet.resume import inexact_resume_reasons, loss_normalizers
from tests.helpers import DEQ, ROOT, SMALL_QUERIES, final_weights, subprocess_env

pytestmark = pytest.mark.slow

LAUNCHER = os.path.join(ROOT, "tests", "engine", "train_net_with_faults.py")
TRAIN_NET = os.path.join(ROOT, "train_net.py")
ENV = subprocess_env(CUDA_VISIBLE_DEVICES="")

# 12 iterations of batch 2 at about 100 px from the shipped configs, a checkpoint every 2; the data
# loader settings are the configs' own (DATALOADER.NUM_WORKERS 1, ASPECT_RATIO_GROUPING True; the
# combined detector with 2 workers): shapes_mini_train has 2 portrait images among 30 landscape
# ones, so an aspect-ratio group is partly filled at every checkpoint.
USER_RUN = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "()", "SEED", "7",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "4", "SOLVER.MAX_ITER", "12",
    "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.MIN_SIZE_TRAIN", "(96, 112)", "INPUT.MAX_SIZE_TRAIN", "128",
    "MODEL.DEVICE", "cpu",
]
DETECTORS = {
    "atss_dyhead": ["configs/shapes/atss_dyhead_r18.yaml", "MODEL.DYHEAD.NUM_CONVS", "1"],
    "deqdet": ["configs/shapes/deqdet_r18.yaml", *SMALL_QUERIES, "MODEL.DEQDET.REFINEMENT_STEPS", "3",
               "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3)", "MODEL.DEQDET.RAG", "1",
               "MODEL.DEQDET.MAX_ITERS", "3"],
    "dense_query": ["configs/shapes/dyhead_deqdet_r18.yaml", "MODEL.QUERY.NUM_QUERIES", "8",
                    "MODEL.QUERY.FFN_DIM", "64", "MODEL.QUERY.IN_POINTS", "4", "MODEL.QUERY.OUT_POINTS", "8",
                    "MODEL.DEQDET.MAX_ITERS", "3", "DATALOADER.NUM_WORKERS", "2"],
}


def _argv(name, out, resume=False):
    config, *opts = DETECTORS[name]
    return [*(["--resume"] if resume else []), "--config-file", os.path.join(ROOT, config), *USER_RUN, *opts,
            "OUTPUT_DIR", str(out)]


def _train_net(argv):
    proc = subprocess.run([sys.executable, TRAIN_NET, *argv], env=ENV, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_after_checkpoint(argv, out, checkpoint):
    """Start ``train_net.py``; send SIGKILL as soon as ``checkpoint`` appears in ``out``."""
    proc = subprocess.Popen([sys.executable, TRAIN_NET, *argv], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not os.path.exists(os.path.join(out, checkpoint)) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "model_final.pth")), "finished before the kill"


def _last_checkpoint(folder):
    with open(os.path.join(folder, "last_checkpoint")) as f:
        return f.read().strip()


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=0.0, msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Final weights of uninterrupted runs, by detector."""
    runs = {}
    for name in DETECTORS:
        out = tmp_path_factory.mktemp(f"straight_{name}")
        _train_net(_argv(name, out))
        runs[name] = final_weights(str(out))
    return runs


@pytest.mark.parametrize("name", list(DETECTORS))
def test_kill_9_after_a_checkpoint_then_resume(name, straight, tmp_path):
    _kill_after_checkpoint(_argv(name, tmp_path), tmp_path, "model_0000003.pth")
    resumed_from = _last_checkpoint(tmp_path)
    proc = _train_net(_argv(name, tmp_path, resume=True))
    resumed_at = int(resumed_from[len("model_"):-len(".pth")]) + 1
    assert f"resuming at iteration {resumed_at}: data stream, random draws" in proc.stdout + proc.stderr
    _assert_same_weights(final_weights(str(tmp_path)), straight[name])


def test_kill_while_writing_a_checkpoint_then_resume(straight, tmp_path):
    env = {**ENV, "FAULT_KILL_SAVING": "model_0000003"}
    proc = subprocess.run([sys.executable, LAUNCHER, *_argv("deqdet", tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Killed half-way through writing the checkpoint of iteration 3: the half-written file never
    # took the checkpoint's name and last_checkpoint still names the previous complete one.
    assert os.path.isfile(tmp_path / ".model_0000003.incomplete.pth")
    assert not os.path.exists(tmp_path / "model_0000003.pth")
    assert _last_checkpoint(tmp_path) == "model_0000001.pth"
    torch.load(tmp_path / "model_0000001.pth", weights_only=False)  # complete and readable
    _train_net(_argv("deqdet", tmp_path, resume=True))  # resumes at iteration 2
    assert _last_checkpoint(tmp_path) == "model_final.pth"
    _assert_same_weights(final_weights(str(tmp_path)), straight["deqdet"])


def test_resume_restores_the_deq_loss_scale_and_the_data_position(tmp_path):
    """The stash's observed loss scale (the AMP scale of the previous backward) is part of the
    trainer's checkpointed state; the data stream continues at the next iteration's batch."""
    cfg = build_config(DEQ[1], [*DEQ[2:], "OUTPUT_DIR", str(tmp_path)])
    first = Trainer(cfg)
    first.model.decoder.set_loss_scale(1024.0)
    first.iter = 1
    first.checkpointer.save("model_0000001")
    second = Trainer(cfg)
    assert second.model.decoder.get_loss_scale() == 1.0
    second.resume_or_load(resume=True)
    assert second.model.decoder.get_loss_scale() == 1024.0
    assert second.start_iter == 2 and second.data_loader.dataset.start == 2


def test_resume_restores_retinanet_loss_normalizer(tmp_path):
    """Detectron2's RetinaNet keeps its moving-average loss normaliser in a plain attribute, outside
    the model's state_dict: the trainer's checkpoint carries it."""
    cfg = build_config(os.path.join(ROOT, "configs", "shapes", "retinanet_r18.yaml"), [
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('shapes_mini_train',)", "OUTPUT_DIR", str(tmp_path)])
    first = Trainer(cfg)
    first.model.loss_normalizer = 37.5
    first.iter = 1
    first.checkpointer.save("model_0000001")
    second = Trainer(cfg)
    assert loss_normalizers(second.model) == {}  # Detectron2 sets the attribute at the first step
    second.resume_or_load(resume=True)
    assert second.model.loss_normalizer == 37.5


def test_what_cannot_be_resumed_exactly_is_named():
    cfg = build_config(DEQ[1], [*DEQ[2:], "SOLVER.CHECKPOINT_PERIOD", "4"])
    assert inexact_resume_reasons(cfg, 8, stream_resumed=True) == []
    reasons = inexact_resume_reasons(cfg, 6, stream_resumed=False)
    assert len(reasons) == 2
    assert "the data order starts afresh" in reasons[0]
    assert "iteration 6 is not a multiple of SOLVER.CHECKPOINT_PERIOD 4" in reasons[1]
    cuda = build_config(DEQ[1], [*DEQ[2:], "MODEL.DEVICE", "cuda"])
    assert "CUDA kernels" in inexact_resume_reasons(cuda, 8, stream_resumed=True)[0]
