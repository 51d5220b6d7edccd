#!/usr/bin/env python
"""Parameters, FLOPs and activations of a config's model, as Detectron2's ``tools/analyze_model.py``.

    .venv/bin/python tools/analyze_model.py --config-file configs/shapes/deqdet_r18.yaml
    .venv/bin/python tools/analyze_model.py --config-file X.yaml --tasks flop --size 800x1333 \\
        --opts MODEL.WEIGHTS output/x/model_final.pth MODEL.DEVICE cpu

``--tasks`` (default all three):

* ``parameter``: the model's parameters, total and trainable, per top-level module;
* ``flop``: fvcore's count (one multiply-add = one flop, its convention) of one eval-mode inference on
  one random image of ``--size`` (default the test size: ``INPUT.MIN_SIZE_TEST`` x
  ``INPUT.MAX_SIZE_TEST``), per top-level module; the deformable convolutions of DyHead are counted as
  the 3x3 convolution they compute, and the operators fvcore cannot count are listed;
* ``activation``: fvcore's activation count of the same inference (outputs of convolutions and matrix
  products), per top-level module.

The model is built as training builds it, with ``MODEL.WEIGHTS`` loaded when given (the weights
change no count, but a DEQ decoder's solver steps and the detections kept depend on them). Counts of
the FLOPs and activations depend on the image for the parts that run per detection or per solver
step. Runs on ``MODEL.DEVICE``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from typing import Dict, Iterator, List, Tuple

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import ActivationCountAnalysis
from tabulate import tabulate

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import build_inference_model
from deqdet.modeling.dyhead.dyconv import ModulatedDeformConv3x3
from deqdet.quiet import silence_known_warnings

TASKS = ("parameter", "flop", "activation")
DEFORM_CONV = "torchvision::deform_conv2d"
Counts = Dict[str, int]  # per module or per operator


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to count (default: all)"
    )
    parser.add_argument(
        "--size", metavar="HxW", help="the image of the FLOP and activation counts (default: the test size)"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def parse_size(text: str) -> Tuple[int, int]:
    """``"800x1333"`` -> (800, 1333).

    Raises:
        UserInputError: not two positive integers joined by ``x``.
    """
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or not all(int(v) > 0 for v in match.groups()):
        raise UserInputError(f"--size {text!r}: expected HxW, e.g. 800x1333")
    return int(match.group(1)), int(match.group(2))


def default_size(cfg) -> Tuple[int, int]:
    """The largest image the test-time resize makes: ``MIN_SIZE_TEST`` x ``MAX_SIZE_TEST``."""
    return cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST


def random_inputs(size: Tuple[int, int], device: str) -> List[dict]:
    """One random image (values 0..255, fixed seed) of ``size`` in the model's input format."""
    h, w = size
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0)).float()
    return [{"image": image.to(device), "height": h, "width": w}]


def _counts(params) -> Tuple[int, int]:
    """(parameters, trainable ones) of a list of parameters."""
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_counts(model: torch.nn.Module) -> List[Tuple[str, int, int]]:
    """``(top-level module, parameters, trainable ones)`` per child of ``model`` that has
    parameters, then ``("(own)", ...)`` for those of ``model`` itself, if any."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if params:
            rows.append((name, *_counts(params)))
    own = list(model.parameters(recurse=False))
    if own:
        rows.append(("(own)", *_counts(own)))
    return rows


def _deform_conv_flops(inputs, outputs) -> int:
    """``torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)`` as the 3x3 convolution
    it computes: C_in * 9 multiply-adds per output value."""
    weight_shape = inputs[1].type().sizes()
    return math.prod(outputs[0].type().sizes()) * math.prod(weight_shape[1:])


def _deform_conv_activations(inputs, outputs) -> int:
    """The output values of ``torchvision::deform_conv2d``, as fvcore counts a convolution's."""
    return math.prod(outputs[0].type().sizes())


@contextlib.contextmanager
def traceable(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in the form fvcore's tracer counts: the deformable convolutions on torchvision's
    kernel (one operator, :func:`_deform_conv_flops`; the ``sampling`` implementation would be
    counted as its gathers), a DEQ decoder's solver without ``torch.compile`` or CUDA graphs (the same
    operations, which the tracer cannot follow); restored afterwards."""
    dcns = [m for m in model.modules() if isinstance(m, ModulatedDeformConv3x3)]
    impls = [m.impl for m in dcns]
    solver = getattr(getattr(model, "decoder", None), "inference", None)
    accelerated = {k: getattr(solver, k) for k in ("compile_stage", "cuda_graph") if hasattr(solver, k)}
    try:
        for m in dcns:
            m.impl = "torchvision"
        for key in accelerated:
            setattr(solver, key, False)
        yield
    finally:
        for m, impl in zip(dcns, impls):
            m.impl = impl
        for key, value in accelerated.items():
            setattr(solver, key, value)


def by_top_module(analysis, model: torch.nn.Module) -> Dict[str, int]:
    """fvcore's counts per child of ``model`` (the analysis runs on a ``TracingAdapter`` that holds
    it as ``model``), the modules the analysis never reached left out."""
    counts = analysis.by_module()
    names = [name for name, _ in model.named_children()]
    return {name: counts[f"model.{name}"] for name in names if counts.get(f"model.{name}")}


def count_flops(model: torch.nn.Module, inputs: List[dict]) -> Tuple[int, Counts, Counts, Counts]:
    """(total FLOPs, per top-level module, per operator, ``{operator: times}`` that fvcore could not
    count)."""
    with traceable(model), torch.no_grad():
        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle(DEFORM_CONV, _deform_conv_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        operators = dict(analysis.by_operator())
        return analysis.total(), by_top_module(analysis, model), operators, dict(analysis.unsupported_ops())


def count_activations(model: torch.nn.Module, inputs: List[dict]) -> Tuple[int, Dict[str, int]]:
    """(total activations, per top-level module)."""
    with traceable(model), torch.no_grad():
        wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
        analysis = ActivationCountAnalysis(wrapper, wrapper.flattened_inputs)
        analysis.set_op_handle(DEFORM_CONV, _deform_conv_activations)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return analysis.total(), by_top_module(analysis, model)


def _module_table(counts: Dict[str, int], total: int, unit: float, header: str) -> str:
    rows = [[name, f"{n / unit:.3f}"] for name, n in counts.items()] + [["total", f"{total / unit:.3f}"]]
    return tabulate(rows, headers=["module", header], tablefmt="pipe", colalign=("left", "right"))


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    try:
        cfg = build_config(args.config_file, args.opts)
        size = parse_size(args.size) if args.size else default_size(cfg)
        model = build_inference_model(cfg)[0] if cfg.MODEL.WEIGHTS else build_model(cfg).eval()
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if "parameter" in args.tasks:
        rows = parameter_counts(model)
        total, trainable = _counts(list(model.parameters()))
        table = [[name, f"{n:,}", f"{t:,}"] for name, n, t in [*rows, ("total", total, trainable)]]
        print(tabulate(table, headers=["module", "parameters", "trainable"], tablefmt="pipe",
                       colalign=("left", "right", "right")))
        print(f"parameters: {total:,} ({trainable:,} trainable)")
    inputs = random_inputs(size, cfg.MODEL.DEVICE)
    where = f"one {size[0]}x{size[1]} image"
    if "flop" in args.tasks:
        total, per_module, operators, unsupported = count_flops(model, inputs)
        print(_module_table(per_module, total, 1e9, "GFLOPs"))
        by_count = sorted(operators.items(), key=lambda item: -item[1])
        shares = ", ".join(f"{op} {n / max(total, 1):.1%}" for op, n in by_count)
        print(f"by operator: {shares}")
        print(f"GFLOPs of {where}: {total / 1e9:.3f} (fvcore: one multiply-add = one flop)")
        if unsupported:
            ops = ", ".join(f"{op} ({n}x)" for op, n in sorted(unsupported.items()))
            print(f"operators not counted: {ops}")
    if "activation" in args.tasks:
        total, per_module = count_activations(model, inputs)
        print(_module_table(per_module, total, 1e6, "M activations"))
        print(f"activations of {where}: {total / 1e6:.3f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
