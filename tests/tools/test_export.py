"""Exports that explain themselves: outputs in the documented order, named in a JSON next to the
file with the class names; no autograd in the exported graph; a wrong input size names the expected
one; deqdet.export.load resizes as at test time and returns what the eager DefaultPredictor finds.
ONNX (the optional `export` extra) is checked when onnx and onnxruntime are installed: ATSS + DyHead,
and the flagship (RetinaNet + DyHead dense head, DEQ decoder) against its eager outputs. Without the
extra, or when the exporter fails, the tool prints one line (the install command; the cause and the
log with the exporter's full output)."""

import json
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from deqdet.checkpoint.classes import CHECKPOINT_KEY
from deqdet.engine import build_config
from deqdet.export import INSTALL_EXPORT_EXTRA, load
from deqdet.inference import build_inference_model
from deqdet.predictor import Predictor
from tests.helpers import TINY_DENSE_QUERY, config_file

ATSS_CONFIG = config_file("shapes", "atss_dyhead_r18.yaml")
# small widths; images resized as at test time to 96 px (shortest edge): 192 x 256 -> 96 x 128
OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ATSS.INFERENCE_TH", "0.0",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
]
NAMES = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]
FLAGSHIP_CONFIG = config_file("shapes", "retinanet_dyhead_deqdet_r18.yaml")
FLAGSHIP_OPTS = [*TINY_DENSE_QUERY, "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ATSS + DyHead checkpoint that names its classes, as training writes them."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights")
    classes = {"names": NAMES, "dataset_ids": list(range(1, 9)), "source": "dataset 'x'"}
    DetectionCheckpointer(build_model(build_config(ATSS_CONFIG, OPTS)), str(path)).save(
        "model", **{CHECKPOINT_KEY: classes})
    return str(path / "model.pth")


@pytest.fixture(scope="module")
def flagship_weights(tmp_path_factory):
    """A randomly initialised flagship checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flagship")
    DetectionCheckpointer(build_model(build_config(FLAGSHIP_CONFIG, FLAGSHIP_OPTS)), str(path)).save("model")
    return str(path / "model.pth")


def _run_tool(weights, out, formats=("torchscript",), config=ATSS_CONFIG, opts=OPTS) -> int:
    from tools.export import main

    return main(["--config-file", config, "--output", str(out), "--format", *formats,
                 "--size", "96", "128", "--opts", *opts, "MODEL.WEIGHTS", weights])


def _export(weights, out, formats=("torchscript",)):
    assert _run_tool(weights, out, formats) == 0


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
    assert "onnx: " in out and "max |onnxruntime - eager| on the sample" in out
    scripted, onnx = load(str(tmp_path / "m.ts"))(_image()), load(str(tmp_path / "m.onnx"))(_image())
    # the best 10: further down, onnxruntime's float differences (2e-5) can flip a near-tie in NMS
    np.testing.assert_allclose(onnx["boxes"][:10], scripted["boxes"][:10], rtol=0, atol=1e-3)
    assert list(onnx["labels"][:10]) == list(scripted["labels"][:10])


def test_flagship_exports_to_onnx_computing_what_eager_computes(flagship_weights, tmp_path, capsys):
    """Before: "Unsupported: ONNX export of batch_norm for unknown channel size" (the RetinaNet head's
    per-level BatchNorms have no affine parameters) after 4,846 lines of exporter output."""
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from tools.export import adapter_for, export_config, sample_input

    out = tmp_path / "m"
    assert _run_tool(flagship_weights, out, ("onnx",), FLAGSHIP_CONFIG, FLAGSHIP_OPTS) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[1].startswith(f"onnx: {out}.onnx; max |onnxruntime - eager|")

    cfg = export_config(FLAGSHIP_CONFIG, [*FLAGSHIP_OPTS, "MODEL.WEIGHTS", flagship_weights])
    model, _ = build_inference_model(cfg)
    session = onnxruntime.InferenceSession(str(out) + ".onnx", providers=["CPUExecutionProvider"])
    for seed in (0, 1):  # the sample the tool traced on, and another input
        image = sample_input(cfg, None, (96, 128), seed=seed)
        with torch.no_grad():
            eager = adapter_for(model, image)(image)
        got = session.run(None, {"image": image.numpy()})
        assert len(got) == len(eager) == 5 and len(got[0]) > 0  # boxes, scores, classes, residuals, steps
        for name, x, y in zip(["boxes", "scores", "classes", "residuals", "steps"], got, eager):
            np.testing.assert_allclose(x, y.numpy(), rtol=0, atol=1e-4, err_msg=f"{name}, input {seed}")


def test_a_failed_onnx_export_prints_one_line_and_logs_the_rest(weights, tmp_path, capsys, monkeypatch):
    import tools.export

    graph = "Torch IR graph at exception: graph(%image : Float(3, 96, 128)):\n"
    graph += "  %1 = aten::relu()\n" * 4000

    def failing_export(*args, **kwargs):
        print("a note of the exporter")
        raise RuntimeError("Unsupported: ONNX export of batch_norm for unknown channel size.  [Caused by the "
                           "value 'input.1' (type 'Tensor') in the TorchScript graph.]\n\n" + graph)

    monkeypatch.setattr(tools.export, "missing_export_extra", lambda: [])
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    assert _run_tool(weights, tmp_path / "m", ("onnx",)) == 1
    printed = capsys.readouterr().out.splitlines()
    log = tmp_path / "m.onnx.log"
    assert len(printed) == 2 and printed[1] == (
        "onnx: not exported: Unsupported: ONNX export of batch_norm for unknown channel size. "
        f"(the exporter's full output: {log})")
    assert "a note of the exporter" in log.read_text() and graph in log.read_text()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("missing", [["onnx", "onnxruntime"], ["onnxruntime"]])
def test_without_the_export_extra_the_tool_names_its_install_command(weights, tmp_path, capsys, monkeypatch,
                                                                      missing):
    import tools.export

    monkeypatch.setattr(tools.export, "missing_export_extra", lambda: missing)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: None)  # onnx present: "exported"
    assert _run_tool(weights, tmp_path / "m", ("onnx",)) == (1 if "onnx" in missing else 0)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith(f"not installed (the optional extra 'export'; from the repository root: "
                         f"{INSTALL_EXPORT_EXTRA})")
    assert last.startswith("onnx: not exported: onnx and onnxruntime" if "onnx" in missing
                           else f"onnx: {tmp_path / 'm'}.onnx; not checked: onnxruntime")


def test_loading_an_onnx_model_without_onnxruntime_names_the_install_command(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    with pytest.raises(ImportError, match=r"needs onnxruntime, of the optional extra 'export' \(from the "
                                          r"repository root: \.venv/bin/pip install -e '\.\[export\]'\)"):
        load(str(exported[0].with_suffix(".onnx")))


def test_expm1_exports_with_its_accuracy(tmp_path):
    """The combined detector's score uses torch.expm1, which the ONNX exporter has no symbolic for;
    deqdet.export.onnx_symbolics writes it as accurately as torch computes it, also where exp(x) - 1
    cancels (|x| << 1)."""
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from deqdet.export import ONNX_OPSET, onnx_symbolics

    class Expm1(torch.nn.Module):
        def forward(self, x):
            return torch.expm1(x)

    x = torch.cat([-torch.logspace(-12, 2, 500), torch.logspace(-12, 1.5, 500), torch.tensor([0.0, -200.0])])
    with onnx_symbolics():
        torch.onnx.export(Expm1(), (x,), str(tmp_path / "e.onnx"), opset_version=ONNX_OPSET, dynamo=False,
                          input_names=["x"])
    got = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, torch.expm1(x).numpy(), rtol=1e-6, atol=0)
