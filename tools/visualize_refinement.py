#!/usr/bin/env python
"""Watch a DEQ decoder refine its boxes: a PNG grid (rows: images; columns: the init stage and
refinement steps 1, 2, 4, ...), the residual and top-score curves per step, and an animated GIF.

    .venv/bin/python tools/visualize_refinement.py --config-file configs/shapes/deqdet_r18.yaml \\
        --input img1.png img2.png --output output/refinement/shapes \\
        --opts MODEL.WEIGHTS output/deqdet_r18/model_final.pth

writes ``output/refinement/shapes_grid.png``, ``..._curves.png`` and ``shapes.gif``; boxes are
labelled with the class names stored in the checkpoint. An input that cannot be read, or a path or
glob that names no file, is reported in one line (``skipped ...``) and skipped.
"""

from __future__ import annotations

import argparse
import sys

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import build_inference_model, read_inputs
from deqdet.quiet import silence_known_warnings
from deqdet.visualization import render_refinement


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of a DEQ-decoder model")
    parser.add_argument("--input", nargs="+", required=True, help="images: files, globs or folders (a few)")
    parser.add_argument("--output", required=True, help="path prefix of the PNGs and the GIF")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="grid columns, 0 = init stage (default: 0 1 2 4 ... MAX_ITERS+1)",
    )
    parser.add_argument("--num-boxes", type=int, default=10, help="top detections drawn per image and step")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    try:
        cfg = build_config(args.config_file, args.opts)
        images = read_inputs(args.input, cfg.INPUT.FORMAT)
        model, classes = build_inference_model(cfg)  # the training data's class names, from the checkpoint
        metadata = classes.metadata() if classes else None
        written = render_refinement(
            cfg, model, images, args.output, metadata, steps=args.steps, num_boxes=args.num_boxes
        )
    except (UserInputError, ValueError) as e:
        print(f"error: {one_line(e) if isinstance(e, UserInputError) else e}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
