#!/usr/bin/env python
"""Export a detector to TorchScript (traced through Detectron2's ``TracingAdapter``) and, where
the ops allow, to ONNX; check that the exported model computes what the eager model computes.

    .venv/bin/python tools/export.py --config-file configs/shapes/deqdet_r18.yaml \\
        --output output/export/deqdet --format torchscript onnx \\
        --opts MODEL.WEIGHTS output/deqdet_r18/model_final.pth

The model is traced on one sample input: ``--input IMAGE`` (resized as at test time) or, without
it, a random image of ``--size H W`` (default: ``INPUT.MIN_SIZE_TEST`` square). The exported
model takes what the detector's ``forward`` takes after the data mapper: one image tensor (3, H, W),
float, in ``INPUT.FORMAT`` pixel values, and returns the tuple ``(boxes, scores, classes)`` (DEQ
decoders also ``residuals``, ``steps``; :mod:`deqdet.export` documents each), without autograd.
It is traced at the sample's size: the TorchScript model refuses another size with an error naming
the expected one. ``{output}.json`` names the input and outputs and holds the class names of the
training data; ``deqdet.export.load(path)`` reads both, resizes an image as at test time and returns
named fields. A DEQ decoder is exported with a fixed number of refinement steps:
``MODEL.DEQDET.TOL`` is set to 0, so it always runs ``MAX_ITERS`` + 1 steps (the per-image early
stop is data-dependent control flow, which tracing cannot keep). Likewise a ``DenseQueryDetector``
keeps the sample's number of dense boxes after NMS (normally ``NUM_QUERIES``).

Writes ``{output}.ts`` (``torch.jit.load``), ``{output}.onnx`` when ONNX export succeeds (needs
``pip install .[export]``: onnx, and onnxruntime to check it), ``{output}.json``, and prints the
largest difference between the exported and the eager outputs on the sample and on a second random
input of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Tuple

import numpy as np
import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.export import DEQ_OUTPUTS, OUTPUTS, describe, description_path, ordered_outputs
from deqdet.inference import build_inference_model
from deqdet.quiet import silence_known_warnings

FORMATS = ("torchscript", "onnx")


def export_config(config_file: str, opts: List[str]):
    """The config with a DEQ decoder's early stop off (``TOL 0``, fixed ``MAX_ITERS`` + 1 steps) and its
    stage neither compiled nor replayed from a CUDA graph (traced as plain modules)."""
    return build_config(config_file, [*opts, "MODEL.DEQDET.TOL", "0.0", "MODEL.DEQDET.COMPILE", "False",
                                     "MODEL.DEQDET.CUDA_GRAPH", "False"])


def sample_input(cfg, image_path: str | None, size: Tuple[int, int] | None, seed: int = 0) -> torch.Tensor:
    """(3, H, W) float: the image resized as at test time, or a random image of ``size``."""
    if image_path:
        image = read_image(image_path, format=cfg.INPUT.FORMAT)
        image = (
            T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
            .get_transform(image)
            .apply_image(image)
        )
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    h, w = size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).round()


def adapter_for(model, image: torch.Tensor) -> TracingAdapter:
    """``TracingAdapter`` over ``model([{"image": image}])`` returning
    :func:`deqdet.export.ordered_outputs`: ``(boxes, scores, classes[, residuals, steps])``."""

    def inference(model, inputs):
        return ordered_outputs(model(inputs)[0])

    return TracingAdapter(model, [{"image": image.to(model.device)}], inference_func=inference).eval()


@torch.no_grad()
def output_names(model, image: torch.Tensor) -> List[str]:
    """The names of the exported outputs, in order (DEQ decoders add residuals and steps)."""
    output = model([{"image": image.to(model.device)}])[0]
    return [*OUTPUTS, *(k for k in DEQ_OUTPUTS if k in output)]


class SizeChecked(torch.nn.Module):
    """A traced model behind a check of its input's shape: another shape stops with an error that
    names the expected one, instead of failing deep inside the traced graph."""

    def __init__(self, traced: torch.nn.Module, shape: List[int]):
        super().__init__()
        self.traced, self.shape = traced, shape

    def forward(self, image: torch.Tensor):
        if list(image.shape) != self.shape:
            raise ValueError(
                "this model was exported for images of shape " + str(self.shape) + " (3, H, W), got "
                + str(list(image.shape)) + ": resize as at test time to that size (deqdet.export.load does)"
            )
        return self.traced(image)


def max_difference(a, b) -> float:
    """Largest absolute difference between two tuples of tensors (inf when their shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


@torch.no_grad()
def export_torchscript(model, image: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``image`` (its parameters frozen: the outputs carry no autograd) behind
    :class:`SizeChecked`; save to ``path``."""
    model.requires_grad_(False)
    adapter = adapter_for(model, image)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False, strict=False)
    scripted = torch.jit.script(SizeChecked(traced, list(image.shape)))
    scripted.save(path)
    return scripted


@torch.no_grad()
def check_torchscript(model, path: str, images: List[torch.Tensor]) -> List[float]:
    """Per image: the largest difference between the saved TorchScript model and the eager model."""
    loaded = torch.jit.load(path, map_location=model.device)
    diffs = []
    for image in images:
        adapter = adapter_for(model, image)
        diffs.append(max_difference(loaded(*adapter.flattened_inputs), adapter(*adapter.flattened_inputs)))
    return diffs


@torch.no_grad()
def export_onnx(model, image: torch.Tensor, path: str, names: List[str]) -> str:
    """Try ``torch.onnx.export`` (TorchScript-based exporter, opset 17; input ``image``, outputs
    ``names``); returns "" or why it failed."""
    model.requires_grad_(False)
    adapter = adapter_for(model, image)
    try:
        torch.onnx.export(adapter, adapter.flattened_inputs, path, opset_version=17, dynamo=False,
                          input_names=["image"], output_names=names)
    except Exception as e:  # the exporter raises many types; its message names the op at fault
        if os.path.exists(path):
            os.remove(path)
        return " ".join(str(e).split())[:400]
    return ""


def check_onnx(path: str, adapter: TracingAdapter) -> str:
    """Run the ONNX file with onnxruntime (when installed) -> a one-line verdict."""
    try:
        import onnxruntime
    except ImportError:
        return "not run (onnxruntime is not installed)"
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's
    runtime = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.cpu().numpy() for i, x in zip(runtime.get_inputs(), adapter.flattened_inputs)}
    got = tuple(torch.from_numpy(x) for x in runtime.run(None, feeds))
    return f"onnxruntime max |difference| {max_difference(got, adapter(*adapter.flattened_inputs)):.3g}"


def main(argv=None) -> int:
    silence_known_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="path prefix of the exported files")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["torchscript"])
    parser.add_argument("--input", help="a sample image to trace with (default: a random image)")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="size of the random sample image"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    # Python branches on tensors are fixed at the sample by tracing (module docstring); tracing and
    # the TorchScript-based ONNX exporter are what this tool uses on purpose, so PyTorch's notices
    # that it deprecates them are not the user's to act on.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    try:
        cfg = export_config(args.config_file, args.opts)
        if args.input and not os.path.isfile(args.input):
            raise UserInputError(f"--input {args.input}: no such file")
        try:
            image = sample_input(cfg, args.input, args.size)
        except OSError as e:
            raise UserInputError(f"--input {args.input}: cannot read image ({e})") from None
        model, classes = build_inference_model(cfg)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    names = output_names(model, image)
    description = description_path(args.output + ".ts")
    with open(description, "w") as f:
        json.dump(describe(cfg, image.shape[1:], names, classes), f, indent=2)
    print(f"description: {description} (outputs: {', '.join(names)})")
    status = 0
    if "torchscript" in args.format:
        path = args.output + ".ts"
        export_torchscript(model, image, path)
        other = sample_input(cfg, None, tuple(image.shape[1:]), seed=1)
        diffs = check_torchscript(model, path, [image, other])
        print(
            f"torchscript: {path}; max |exported - eager| on the sample {diffs[0]:.3g}, "
            f"on another input of the same size {diffs[1]:.3g}"
        )
    if "onnx" in args.format:
        path = args.output + ".onnx"
        failure = export_onnx(model, image, path, names)
        if failure:
            print(f"onnx: not exported: {failure}")
            status = 1
        else:
            print(f"onnx: {path}; {check_onnx(path, adapter_for(model, image))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
