"""Exported detectors that explain themselves: the outputs in one documented order, a JSON file
next to the exported model that names its input and outputs (and the class names of the training
data), and :func:`load`, which reads both, resizes an image as at test time and returns named
fields.

Every exported model (TorchScript ``.ts``, ONNX ``.onnx``, written by ``tools/export.py``) takes one
input and returns a tuple:

==========  ==========  ===================================================================
name        shape       meaning
==========  ==========  ===================================================================
image       (3, H, W)   input: float32 pixel values 0-255 in ``INPUT.FORMAT`` channel order,
                        the image already resized as at test time to exactly the H x W the
                        model was exported for (tracing fixes the size)
boxes       (N, 4)      XYXY boxes, in pixels of the input image
scores      (N,)        detection scores
classes     (N,)        class indices (int64) into the JSON's ``classes.names``
residuals   (S,)        DEQ decoders only: relative residual of each refinement step
steps       ()          DEQ decoders only: refinement steps run
==========  ==========  ===================================================================

:func:`onnx_exportable` and :func:`onnx_symbolics` let the TorchScript-based ONNX exporter (opset
:data:`ONNX_OPSET`) write every detector of the project, without changing what it computes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes
from torch import nn

__all__ = [
    "DEQ_OUTPUTS", "INSTALL_EXPORT_EXTRA", "ONNX_OPSET", "OUTPUTS", "ExportedDetector", "describe",
    "description_path", "load", "onnx_exportable", "onnx_symbolics", "ordered_outputs",
]

OUTPUTS = ("boxes", "scores", "classes")
ONNX_OPSET = 17
# The optional extra `export` (onnx, onnxruntime; pinned in pyproject.toml) into the project's .venv,
# run from the repository root (`make setup` installs the project without it).
INSTALL_EXPORT_EXTRA = ".venv/bin/pip install -e '.[export]'"
DEQ_OUTPUTS = ("residuals", "steps")
_SHAPES = {"boxes": ["N", 4], "scores": ["N"], "classes": ["N"], "residuals": ["S"], "steps": []}
_MEANINGS = {
    "boxes": "XYXY boxes in pixels of the input image",
    "scores": "detection scores",
    "classes": "class indices into classes.names",
    "residuals": "relative residual of each DEQ refinement step",
    "steps": "DEQ refinement steps run",
}


def ordered_outputs(output: Dict) -> tuple:
    """One image's model output (``{"instances", ["residuals", "steps"]}``) as the tuple of the
    module's table: ``(boxes, scores, classes[, residuals, steps])``."""
    instances = output["instances"]
    fields = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
    return fields + tuple(output[k] for k in DEQ_OUTPUTS if k in output)


def onnx_exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose batch norms without affine parameters have the identity ones
    (weight 1, bias 0, frozen): the same outputs bit for bit (PyTorch's batch norm takes a missing
    weight as 1 and a missing bias as 0), and a graph the TorchScript-based ONNX exporter can write.

    The exporter writes a missing weight or bias as a constant of the input's channel count, and
    stops with "ONNX export of batch_norm for unknown channel size" where its shape inference has
    lost that count. Detectron2's ``RetinaNetHead`` with ``NORM: "BN"`` normalises each pyramid level
    with such a norm (the ``affine=False`` members of its ``CycleBatchNormList``, followed by one
    affine shared by the levels), on the output of a convolution whose input is the DyHead's
    deformable convolution: an ``embedding_bag`` (exported as an ONNX ``Loop``) followed by a
    reshape to sizes computed at run time, after which only the rank of the maps is known.
    """
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
            channels = module.num_features
            module.weight = nn.Parameter(torch.ones(channels, device=device), requires_grad=False)
            module.bias = nn.Parameter(torch.zeros(channels, device=device), requires_grad=False)
            module.affine = True
    return model


def _expm1(g, x):
    """ONNX for ``torch.expm1`` (ONNX has no such operator, and the exporter no symbolic for it):
    ``exp(x) - 1`` where ``|x| >= 1`` (no cancellation there; inf and -1 at the extremes), Kahan's
    ``(exp(x) - 1) x / log(exp(x))`` below, which keeps expm1's accuracy where ``exp(x) - 1``
    cancels (``x`` itself where ``exp(x)`` rounds to 1). Used by the combined detector's score
    (:func:`~deqdet.modeling.dense_query.criterion.quality_logits`)."""
    one = g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0)), x)
    exp = g.op("Exp", x)
    exp_minus_1 = g.op("Sub", exp, one)
    kahan = g.op("Div", g.op("Mul", exp_minus_1, x), g.op("Log", exp))
    small = g.op("Where", g.op("Equal", exp, one), x, kahan)
    return g.op("Where", g.op("Less", g.op("Abs", x), one), small, exp_minus_1)


@contextlib.contextmanager
def onnx_symbolics():
    """Within the block the ONNX exporter (opset :data:`ONNX_OPSET`) also writes ``aten::expm1``
    (:func:`_expm1`), which it has no symbolic for."""
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1, ONNX_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::expm1", ONNX_OPSET)


def description_path(model_path: str) -> str:
    """The JSON next to an exported model: ``deqdet.ts`` -> ``deqdet.json``."""
    return os.path.splitext(model_path)[0] + ".json"


def describe(cfg, image_size: Sequence[int], output_names: Sequence[str], classes) -> dict:
    """The JSON description of a model of ``cfg`` exported at ``image_size`` (H, W) with
    ``output_names``; ``classes`` a :class:`~deqdet.checkpoint.classes.ClassNames` or None."""
    h, w = image_size
    return {
        "input": {"name": "image", "shape": [3, h, w], "dtype": "float32", "format": cfg.INPUT.FORMAT,
                  "pixel_values": "0-255, not normalised (the model normalises)",
                  "test_resize": {"min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST}},
        "outputs": [{"name": n, "shape": _SHAPES[n], "meaning": _MEANINGS[n]} for n in output_names],
        "classes": classes.to_checkpoint() if classes is not None else None,
        "weights": cfg.MODEL.WEIGHTS,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
    }


class ExportedDetector:
    """A model written by ``tools/export.py`` with its description.

    ``detector(image)`` takes an (H0, W0, 3) uint8 image, BGR as ``DefaultPredictor`` takes it (as
    ``cv2.imread`` reads it; ``format="RGB"`` for an RGB one), resizes it as at test time, runs the
    model and returns ``{output name: numpy array}`` with the boxes mapped back to pixels of the
    given image, plus ``labels``: the class names of ``classes`` (their indices when the
    description has none).
    """

    def __init__(self, path: str):
        self.path = path
        with open(description_path(path)) as f:
            self.description = json.load(f)
        self.input_shape = tuple(self.description["input"]["shape"])
        self.output_names: List[str] = [o["name"] for o in self.description["outputs"]]
        classes = self.description.get("classes") or {}
        self.class_names: Optional[List[str]] = classes.get("names")
        resize = self.description["input"]["test_resize"]
        self._resize = T.ResizeShortestEdge([resize["min_size"]] * 2, resize["max_size"])
        if path.endswith(".onnx"):
            try:
                import onnxruntime
            except ImportError:
                raise ImportError(f"{path}: running an ONNX model needs onnxruntime, of the optional extra "
                                  f"'export' (from the repository root: {INSTALL_EXPORT_EXTRA})") from None
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})
        else:
            with warnings.catch_warnings():  # TorchScript is the file's format: its deprecation is not ours
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                        category=FutureWarning)
                module = torch.jit.load(path, map_location="cpu")
            self._run = lambda x: [t.numpy() for t in module(x)]

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """(3, H, W) float32 input and the (x, y) scale from the given image to it.

        Raises:
            ValueError: the resized image is not of the exported size (naming both sizes).
        """
        resized = self._resize.get_transform(image).apply_image(image)
        if (3, *resized.shape[:2]) != self.input_shape:
            raise ValueError(
                f"{self.path} takes images of {self.input_shape[1]} x {self.input_shape[2]} pixels (H x W) "
                f"after the test-time resize; this {image.shape[0]} x {image.shape[1]} image becomes "
                f"{resized.shape[0]} x {resized.shape[1]}: export again with --size "
                f"{resized.shape[0]} {resized.shape[1]} (or --input an image of this size)")
        x = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32))
        return x, resized.shape[1] / image.shape[1], resized.shape[0] / image.shape[0]

    def __call__(self, image: np.ndarray, format: str = "BGR") -> Dict[str, np.ndarray]:
        if format not in ("RGB", "BGR"):
            raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
        if format != self.description["input"]["format"]:
            image = image[:, :, ::-1]
        x, scale_x, scale_y = self.preprocess(image)
        with torch.no_grad():
            outputs = dict(zip(self.output_names, self._run(x)))
        # as Detectron2's detector_postprocess (DefaultPredictor): boxes scaled to the given image,
        # clipped to it, empty ones dropped
        boxes = Boxes(torch.as_tensor(outputs["boxes"]))
        boxes.scale(1 / scale_x, 1 / scale_y)
        boxes.clip(image.shape[:2])
        keep = boxes.nonempty().numpy()
        outputs.update({k: outputs[k][keep] for k in ("scores", "classes")}, boxes=boxes.tensor.numpy()[keep])
        names = self.class_names
        outputs["labels"] = np.array([names[c] if names else str(c) for c in outputs["classes"].tolist()])
        return outputs


def load(path: str) -> ExportedDetector:
    """The exported model at ``path`` (``.ts``, or ``.onnx`` with onnxruntime installed) and the
    JSON description next to it (:func:`description_path`)."""
    return ExportedDetector(path)
