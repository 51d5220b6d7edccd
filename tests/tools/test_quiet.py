"""Quiet by default: a normal training + evaluation run and a prediction run print no warning from
PyTorch, Detectron2 or fvcore that a user cannot act on, no empty summaries, and no progress bar
into output that is not a terminal; importing deqdet prints none either and changes neither the
warning filters nor Detectron2's COCOeval."""

import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import ROOT, subprocess_env

ENV = subprocess_env(CUDA_VISIBLE_DEVICES="")
# Python's own default: no -W or PYTHONWARNINGS setting inherited from the test runner
ENV.pop("PYTHONWARNINGS", None)
NOISE = ("Warning", "No CUDA runtime", "()", "warnings.warn")


def _run(*argv):
    proc = subprocess.run([sys.executable, *argv], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_run_is_quiet(tmp_path):
    """The smoke-run recipe of docs/training.md, shrunk: training, then evaluation on shapes_mini_val."""
    proc = _run("train_net.py", "--config-file", "configs/shapes/atss_dyhead_r18.yaml",
                "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                "INPUT.MIN_SIZE_TEST", "96", "DATASETS.TEST", "('shapes_mini_val',)", "MODEL.DEVICE", "cpu",
                "OUTPUT_DIR", str(tmp_path))
    assert proc.stderr == ""  # warnings, tracebacks and progress bars all go to stderr
    assert "copypaste: AP,AP50" in proc.stdout  # evaluated
    for line in proc.stdout.splitlines():
        if "deqdet" in line and "dataset" in line:  # the data checks' summaries
            assert not any(noise in line for noise in NOISE), line


def test_predict_lists_one_line_per_image_and_nothing_else(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(tmp_path / f"{name}.png")
    proc = _run("tools/predict.py", "--config-file", "configs/shapes/atss_dyhead_r18.yaml",
                "--input", str(tmp_path), "--opts", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64")
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [str(tmp_path / "a.png"),
                                                                          str(tmp_path / "b.png")]
    assert proc.stderr.splitlines() == ["MODEL.WEIGHTS is empty: the model keeps its random initialisation"]


def test_importing_deqdet_is_quiet_and_changes_no_filter_and_no_cocoeval():
    code = ("import warnings; filters = list(warnings.filters); import deqdet; "
            "from deqdet.evaluation import _faster_coco_eval, coco_evaluation; "
            "assert warnings.filters == filters and coco_evaluation.COCOeval_opt is not _faster_coco_eval")
    assert _run("-c", code).stderr == ""
