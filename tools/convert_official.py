#!/usr/bin/env python
"""Convert an official released checkpoint into a Detectron2 checkpoint of this project.

    python tools/convert_official.py --source dyhead IN.pth OUT.pth

The output holds ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}`` and
loads through ``MODEL.WEIGHTS OUT.pth`` with every tensor matched by name. Keys of the official file
that its forward never uses are listed on stdout as dropped.
"""

import argparse
import os
import sys

import torch

import deqdet  # noqa: F401  (registers the converters)
from deqdet.checkpoint import available_sources, convert_official, read_state_dict
from deqdet.errors import UserInputError, one_line
from deqdet.quiet import silence_known_warnings


def main(argv=None) -> int:
    silence_known_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, choices=available_sources())
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise UserInputError(f"{args.output}: output folder {out_dir} does not exist")
        state_dict = read_state_dict(args.input)
        try:
            conversion = convert_official(state_dict, args.source)
        except KeyError as e:
            raise UserInputError(f"{args.input}: {e.args[0]}") from None
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    for key in conversion.dropped:
        print(f"dropped (unused by the official forward): {key}")
    torch.save(
        {
            "model": conversion.state_dict,
            "__author__": f"official {args.source}",
            "matching_heuristics": False,
        },
        args.output,
    )
    print(f"wrote {len(conversion.state_dict)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
