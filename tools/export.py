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

Writes ``{output}.ts`` (``torch.jit.load``), ``{output}.onnx`` when ONNX export succeeds (needs the
optional extra ``export``: onnx, and onnxruntime to check it; ``.venv/bin/pip install -e '.[export]'``),
``{output}.onnx.log`` (the ONNX exporter's own output: its warnings, and on failure the full error
with the graph it stopped at), ``{output}.json``, and prints one line per format with the largest
difference between the exported and the eager outputs on the sample and on a second random input
of the same size.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import sys
import traceback
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
from deqdet.export import (
    DEQ_OUTPUTS, INSTALL_EXPORT_EXTRA, ONNX_OPSET, OUTPUTS, describe, description_path, onnx_exportable,
    onnx_symbolics, ordered_outputs,
)
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


def missing_export_extra() -> List[str]:
    """The modules of the optional extra ``export`` that are not installed: ``onnx`` (to export),
    ``onnxruntime`` (to check the export)."""
    return [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]


def failure_cause(error: Exception) -> str:
    """The first line of the exporter's error without the graph it names (e.g. "Unsupported: ONNX export
    of batch_norm for unknown channel size."); the error's type when its message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0].split("[Caused by")[0].strip()[:300]


@contextlib.contextmanager
def output_to(path: str):
    """Everything the block writes to stdout and stderr goes to the file ``path``: Python's output and
    native code's (the ONNX exporter logs its whole graph from C++ to the process's stdout when it
    fails), through the file descriptors and C's buffers."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            log.flush()
            ctypes.CDLL(None).fflush(None)  # what C++ (std::cout, through C's stdout) still buffers
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


@torch.no_grad()
def export_onnx(model, image: torch.Tensor, path: str, names: List[str], log_path: str) -> str:
    """Export ``model`` traced on ``image`` with ``torch.onnx.export`` (TorchScript-based exporter,
    opset 17; input ``image``, outputs ``names``) through :func:`deqdet.export.onnx_exportable` and
    with :func:`deqdet.export.onnx_symbolics`.
    Whatever the exporter prints, and its error with traceback when it fails, goes to ``log_path``.

    Returns:
        "" on success, else the one-line cause (no ``path`` is left behind).
    """
    model = onnx_exportable(model).requires_grad_(False)
    adapter = adapter_for(model, image)
    cause = ""
    with output_to(log_path), onnx_symbolics():
        try:
            torch.onnx.export(adapter, adapter.flattened_inputs, path, opset_version=ONNX_OPSET, dynamo=False,
                              input_names=["image"], output_names=names)
        except Exception as e:  # the exporter raises many types; its message names the op at fault
            traceback.print_exc()
            cause = failure_cause(e)
    if cause and os.path.exists(path):
        os.remove(path)
    return cause


@torch.no_grad()
def check_onnx(model, path: str, images: List[torch.Tensor]) -> List[float]:
    """Per image: the largest difference between the ONNX model run by onnxruntime (CPU) and the eager
    model."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's
    runtime = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    diffs = []
    for image in images:
        adapter = adapter_for(model, image)
        feeds = {i.name: x.cpu().numpy() for i, x in zip(runtime.get_inputs(), adapter.flattened_inputs)}
        got = tuple(torch.from_numpy(x) for x in runtime.run(None, feeds))
        diffs.append(max_difference(got, adapter(*adapter.flattened_inputs)))
    return diffs


def report_onnx(model, image: torch.Tensor, other: torch.Tensor, prefix: str, names: List[str]) -> int:
    """Export to ``{prefix}.onnx`` and check it on ``image`` and ``other``; print one line. Returns the
    exit status: 1 when onnx is missing or the export fails, else 0."""
    path, log_path = prefix + ".onnx", prefix + ".onnx.log"
    missing = missing_export_extra()
    if "onnx" in missing:
        print(f"onnx: not exported: {' and '.join(missing)} not installed (the optional extra 'export'; "
              f"from the repository root: {INSTALL_EXPORT_EXTRA})")
        return 1
    cause = export_onnx(model, image, path, names, log_path)
    if cause:
        print(f"onnx: not exported: {cause} (the exporter's full output: {log_path})")
        return 1
    if missing:
        print(f"onnx: {path}; not checked: onnxruntime not installed (the optional extra 'export'; "
              f"from the repository root: {INSTALL_EXPORT_EXTRA})")
        return 0
    diffs = check_onnx(model, path, [image, other])
    print(f"onnx: {path}; max |onnxruntime - eager| on the sample {diffs[0]:.3g}, "
          f"on another input of the same size {diffs[1]:.3g}")
    return 0


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
    other = sample_input(cfg, None, tuple(image.shape[1:]), seed=1)
    if "torchscript" in args.format:
        path = args.output + ".ts"
        export_torchscript(model, image, path)
        diffs = check_torchscript(model, path, [image, other])
        print(
            f"torchscript: {path}; max |exported - eager| on the sample {diffs[0]:.3g}, "
            f"on another input of the same size {diffs[1]:.3g}"
        )
    if "onnx" in args.format:
        status = report_onnx(model, image, other, args.output, names)
    return status


if __name__ == "__main__":
    sys.exit(main())
