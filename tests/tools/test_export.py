"""Exports that explain themselves: outputs in the documented order, named in a JSON next to the
file with the class names; no autograd in the exported graph; a wrong input size names the expected
one; deqdet.export.load resizes as at test time and returns what the eager DefaultPredictor finds.
ONNX (the optional `export` extra) is checked when onnxruntime is installed."""

import json

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from deqdet.checkpoint.classes import CHECKPOINT_KEY
from deqdet.engine import build_config
from deqdet.export import load
from deqdet.predictor import Predictor
from tests.helpers import config_file

ATSS_CONFIG = config_file("shapes", "atss_dyhead_r18.yaml")
# small widths; images resized as at test time to 96 px (shortest edge): 192 x 256 -> 96 x 128
OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ATSS.INFERENCE_TH", "0.0",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
]
NAMES = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ATSS + DyHead checkpoint that names its classes, as training writes them."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights")
    classes = {"names": NAMES, "dataset_ids": list(range(1, 9)), "source": "dataset 'x'"}
    DetectionCheckpointer(build_model(build_config(ATSS_CONFIG, OPTS)), str(path)).save(
        "model", **{CHECKPOINT_KEY: classes})
    return str(path / "model.pth")


def _export(weights, out, formats=("torchscript",)):
    from tools.export import main

    assert main(["--config-file", ATSS_CONFIG, "--output", str(out), "--format", *formats,
                 "--size", "96", "128", "--opts", *OPTS, "MODEL.WEIGHTS", weights]) == 0


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory):
    """The TorchScript export of ``weights`` and what the tool printed."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("export") / "m", io.StringIO()
    with contextlib.redirect_stdout(printed):
        _export(weights, out)
    return out, printed.getvalue()


def _image():
    return np.random.default_rng(3).integers(0, 255, (192, 256, 3), dtype=np.uint8)


def test_exported_model_explains_itself(exported):
    out, printed = exported
    assert "outputs: boxes, scores, classes" in printed
    description = json.loads(out.with_suffix(".json").read_text())
    assert [o["name"] for o in description["outputs"]] == ["boxes", "scores", "classes"]
    assert description["input"]["shape"] == [3, 96, 128] and description["classes"]["names"] == NAMES

    module = torch.jit.load(str(out.with_suffix(".ts")))
    boxes, scores, classes = module(torch.rand(3, 96, 128) * 255)
    assert boxes.shape[1] == 4 and scores.shape == classes.shape and classes.dtype == torch.int64
    assert not any(t.requires_grad for t in (boxes, scores, classes))  # before: grad_fn on every output
    expected = r"exported for images of shape \[3, 96, 128\] \(3, H, W\), got \[3, 100, 128\]"
    with pytest.raises(Exception, match=expected):
        module(torch.rand(3, 100, 128))


def test_loader_resizes_as_at_test_time_and_names_the_fields(weights, exported):
    detector = load(str(exported[0].with_suffix(".ts")))
    image = _image()  # BGR, as DefaultPredictor takes it
    found = detector(image)
    np.testing.assert_array_equal(detector(image[:, :, ::-1].copy(), format="RGB")["boxes"], found["boxes"])
    assert set(found) == {"boxes", "scores", "classes", "labels"}
    eager = Predictor(build_config(ATSS_CONFIG, [*OPTS, "MODEL.WEIGHTS", weights]))(image)["instances"]
    assert len(eager) > 0
    np.testing.assert_allclose(found["boxes"], eager.pred_boxes.tensor.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(found["classes"], eager.pred_classes.numpy())
    assert list(found["labels"]) == [NAMES[c] for c in found["classes"]]
    with pytest.raises(ValueError, match=r"takes images of 96 x 128 pixels .* this 100 x 100 image becomes "
                                         r"96 x 96: export again with --size 96 96"):
        detector(image[:100, :100])


def test_onnx_export_when_onnxruntime_is_installed(weights, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _export(weights, tmp_path / "m", ("torchscript", "onnx"))
    out = capsys.readouterr().out
    assert "onnx: " in out and "onnxruntime max |difference|" in out
    scripted, onnx = load(str(tmp_path / "m.ts"))(_image()), load(str(tmp_path / "m.onnx"))(_image())
    # the best 10: further down, onnxruntime's float differences (2e-5) can flip a near-tie in NMS
    np.testing.assert_allclose(onnx["boxes"][:10], scripted["boxes"][:10], rtol=0, atol=1e-3)
    assert list(onnx["labels"][:10]) == list(scripted["labels"][:10])
