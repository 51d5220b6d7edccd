"""The environment report (``python -m deqdet.env``, logged by ``train_net.py``): where deqdet and
detectron2 are imported from, how detectron2 was installed, the versions, the COCO evaluation
backend and the devices."""

import os
import subprocess
import sys

import detectron2
import torch
import torchvision

import deqdet
from deqdet.env import collect_env
from deqdet.evaluation import coco_eval_backend
from tests.helpers import ROOT, subprocess_env


def test_report_names_versions_backend_and_where_packages_are_imported_from():
    report = collect_env().splitlines()
    assert f"deqdet: {os.path.dirname(os.path.abspath(deqdet.__file__))}" in report
    assert f"torchvision: {torchvision.__version__}" in report
    assert f"detectron2: {detectron2.__version__} at {os.path.dirname(detectron2.__file__)}" in report
    assert f"COCO evaluation backend: {coco_eval_backend()}" in report
    assert any(line.startswith(f"torch: {torch.__version__} (CUDA build: ") for line in report)


def test_detectron2_origin_is_read_from_the_setup_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(detectron2, "__file__", str(tmp_path / "__init__.py"))
    assert "detectron2 origin: unknown (not installed by tools/setup_env.py)" in collect_env().splitlines()
    (tmp_path / "DEQDET_ORIGIN.txt").write_text("built from source: /somewhere\n")
    assert "detectron2 origin: built from source: /somewhere" in collect_env().splitlines()


def test_without_cuda_the_report_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert collect_env().splitlines()[-1] == "CUDA devices: none"


def test_module_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "deqdet.env"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, check=True).stdout
    assert f"deqdet: {os.path.join(ROOT, 'projects', 'DEQDet', 'deqdet')}" in out.splitlines()
