#!/usr/bin/env python
"""Write the backbone of a trained detector as a checkpoint another detector can start from.

    python tools/extract_backbone.py output/retinanet_demo/model_final.pth output/shapes_backbone.pth
    python train_net.py --config-file configs/shapes/adamixer_r18.yaml \
        MODEL.WEIGHTS output/shapes_backbone.pth

By default it takes the bottom-up ResNet of an FPN detector (``backbone.bottom_up.*``, e.g. the
RetinaNet demo) and names it as the plain ResNet of the query detectors (``backbone.*``). With
``--by-suffix`` it keeps the ResNet's own names (``stem.*``, ``res2.*``, ...) and marks the file for
Detectron2's name-matching heuristics, so that one file initialises the ResNet of any detector, wherever
the detector nests it (``backbone.*``, ``backbone.bottom_up.*``, ``backbone.backbone.bottom_up.*`` under
DyHead blocks, ``dense.backbone.backbone.bottom_up.*`` in the combined detector):

    python tools/extract_backbone.py output/retinanet_demo/model_final.pth output/trunk.pth --by-suffix

The two configs must agree on the ResNet (depth, widths, norm); loading reports any tensor that does not
fit.
"""

import argparse
import sys

import torch

import deqdet  # noqa: F401
from deqdet.checkpoint import read_state_dict, transfer_backbone
from deqdet.errors import UserInputError, one_line
from deqdet.quiet import silence_known_warnings


def main(argv=None) -> int:
    silence_known_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--from-prefix", default="backbone.bottom_up.")
    parser.add_argument("--to-prefix", default="backbone.")
    parser.add_argument("--by-suffix", action="store_true",
                        help="drop the prefix and let Detectron2 match the names by suffix when loading")
    args = parser.parse_args(argv)
    to_prefix = "" if args.by_suffix else args.to_prefix
    try:
        state_dict = read_state_dict(args.input)
        try:
            backbone = transfer_backbone(state_dict, args.from_prefix, to_prefix)
        except KeyError as e:
            raise UserInputError(f"{args.input}: {e.args[0]}") from None
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    checkpoint = {"model": backbone, "__author__": f"backbone of {args.input}",
                  "matching_heuristics": args.by_suffix}
    torch.save(checkpoint, args.output)
    print(f"wrote {len(backbone)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
