#!/usr/bin/env python
"""Export a detector to TorchScript (traced through Detectron2's ``TracingAdapter``) and, where
the ops allow, to ONNX; check that the exported model computes what the eager model computes.

    .venv/bin/python tools/export.py --config-file configs/shapes/deqdet_r18.yaml \\
        --output output/export/deqdet --format torchscript onnx \\
        --opts MODEL.WEIGHTS output/deqdet_r18/model_final.pth

The model is traced on one sample input: ``--input IMAGE`` (resized as at test time) or, without
it, a random image of ``--size H W`` (default: ``INPUT.MIN_SIZE_TEST`` square). The exported
model takes what the detector's ``forward`` takes after the data mapper: one image tensor (3, H, W),
float, in ``INPUT.FORMAT`` pixel values, and returns the flattened ``Instances`` fields (boxes,
scores, classes; DEQ decoders also residuals and steps). It is traced at the sample's size: feed
images of that size. A DEQ decoder is exported with a fixed number of refinement steps:
``MODEL.DEQDET.TOL`` is set to 0, so it always runs ``MAX_ITERS`` + 1 steps (the per-image early
stop is data-dependent control flow, which tracing cannot keep). Likewise a ``DenseQueryDetector`` with
``QUERY_INIT dense_topk`` keeps the sample's number of dense boxes after NMS (normally ``NUM_QUERIES``).

Writes ``{output}.ts`` (``torch.jit.load``), ``{output}.onnx`` when ONNX export succeeds, and prints
the largest difference between the exported and the eager outputs on the sample and on a second
random input of the same size.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Tuple

import numpy as np
import deqdet  # noqa: F401,I001  (first: its warning filters precede Detectron2's imports; registers models)
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import build_inference_model

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
    """``TracingAdapter`` over ``model([{"image": image}])`` keeping only the instances (and DEQ
    ``residuals`` / ``steps`` when the model returns them)."""

    def inference(model, inputs):
        return [
            {k: v for k, v in out.items() if k in ("instances", "residuals", "steps")}
            for out in model(inputs)
        ]

    return TracingAdapter(model, [{"image": image.to(model.device)}], inference_func=inference).eval()


def max_difference(a, b) -> float:
    """Largest absolute difference between two tuples of tensors (inf when their shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


@torch.no_grad()
def export_torchscript(model, image: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    adapter = adapter_for(model, image)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False, strict=False)
    traced.save(path)
    return traced


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
def export_onnx(model, image: torch.Tensor, path: str) -> str:
    """Try ``torch.onnx.export`` (TorchScript-based exporter, opset 17); returns "" or why it failed."""
    adapter = adapter_for(model, image)
    try:
        torch.onnx.export(adapter, adapter.flattened_inputs, path, opset_version=17, dynamo=False)
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
    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.cpu().numpy() for i, x in zip(runtime.get_inputs(), adapter.flattened_inputs)}
    got = tuple(torch.from_numpy(x) for x in runtime.run(None, feeds))
    return f"onnxruntime max |difference| {max_difference(got, adapter(*adapter.flattened_inputs)):.3g}"


def main(argv=None) -> int:
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
    # Python branches on tensors are fixed at the sample by tracing (module docstring); torch.jit's
    # deprecation notice is not actionable here.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    try:
        cfg = export_config(args.config_file, args.opts)
        if args.input and not os.path.isfile(args.input):
            raise UserInputError(f"--input {args.input}: no such file")
        try:
            image = sample_input(cfg, args.input, args.size)
        except OSError as e:
            raise UserInputError(f"--input {args.input}: cannot read image ({e})") from None
        model, _ = build_inference_model(cfg)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
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
        failure = export_onnx(model, image, path)
        if failure:
            print(f"onnx: not exported: {failure}")
            status = 1
        else:
            print(f"onnx: {path}; {check_onnx(path, adapter_for(model, image))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
