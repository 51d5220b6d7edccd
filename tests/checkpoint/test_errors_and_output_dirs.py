"""A missing, empty or partly written checkpoint (named by MODEL.WEIGHTS or by last_checkpoint)
ends in one line naming the file; every config writes to an OUTPUT_DIR of its own."""

import glob
import os

import pytest
import torch

import train_net
from deqdet.engine import build_config
from tests.helpers import config_file

CONFIG = config_file("shapes", "demo.yaml")
TINY = ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST",
        "('shapes_mini_val',)", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "1"]


def _error(argv):
    with pytest.raises(SystemExit) as info:
        train_net.cli(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def broken_files(tmp_path):
    """A zero-byte file and the first half of a real checkpoint (a save cut short)."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}, "iteration": 3}, whole)
    partial = tmp_path / "partial.pth"
    partial.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return {"missing": tmp_path / "missing.pth", "empty": empty, "partial": partial}


def test_bad_model_weights_are_named(tmp_path, broken_files):
    expected = {"missing": "checkpoint not found: {} (named by MODEL.WEIGHTS)",
                "empty": "checkpoint is an empty file: {} (named by MODEL.WEIGHTS)",
                "partial": "cannot load checkpoint {} (named by MODEL.WEIGHTS): "}
    for kind, path in broken_files.items():
        message = _error(["--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(path),
                          "OUTPUT_DIR", str(tmp_path / "eval")])
        assert expected[kind].format(path) in message, message


def test_bad_last_checkpoint_is_named_on_resume(tmp_path, broken_files):
    out = tmp_path / "out"
    out.mkdir()
    for kind, path in broken_files.items():
        (out / "last_checkpoint").write_text(os.path.relpath(path, out))
        message = _error(["--config-file", CONFIG, "--resume", *TINY, "OUTPUT_DIR", str(out)])
        named = f"{out / os.path.relpath(path, out)} (named by {out / 'last_checkpoint'})"
        assert named in message, message
        reason = {"missing": "not found", "empty": "empty file", "partial": "PytorchStreamReader"}[kind]
        assert reason in message, message


def test_every_config_has_its_own_output_dir():
    configs = sorted(glob.glob(config_file("**", "*.yaml"), recursive=True))
    runnable = [c for c in configs if not os.path.basename(c).startswith("Base-")]
    assert len(runnable) >= 19  # the glob found the configs
    output_dirs = {c: build_config(c).OUTPUT_DIR for c in runnable}
    assert "./output" not in output_dirs.values(), output_dirs
    assert len(set(output_dirs.values())) == len(runnable), output_dirs
