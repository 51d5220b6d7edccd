#!/usr/bin/env python
"""Browse a dataset's ground truth as training sees it (Detectron2's ``tools/visualize_data.py``,
mmdetection's ``browse_dataset``), with the project's checks shown: every box is drawn with its
class name; a box clipped to its image is drawn clipped and labelled ``(clipped)``; a dropped box
(zero size, outside the image) is drawn dashed, as annotated, and labelled with the reason.

    .venv/bin/python tools/browse_dataset.py --dataset shapes_mini_train --output output/browse --num 20

Your own dataset: ``--config-file X.yaml --opts DATASETS.COCO_FILES "('mine=ann.json:images',)"``.
The annotation file's own problems (malformed boxes, orphan annotations, ...) and the images the
checks refuse are named on stderr, as when training starts; refused images are not drawn. Prints
one line per image drawn with its counts of boxes, clipped and dropped ones.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer

from deqdet.data.checks import clean_box, image_problem
from deqdet.data.loading import load_dataset
from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.quiet import silence_known_warnings

KEPT, CLIPPED, DROPPED = "kept", "clipped", "dropped"


def count(n: int, noun: str) -> str:
    """``1 box``, ``2 boxes``."""
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("x") else "s")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, help="a registered dataset's name")
    parser.add_argument("--output", required=True, help="folder for the drawings (one PNG per image)")
    parser.add_argument("--num", type=int, help="draw only the first NUM images")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="drawing size relative to the image (default 1)"
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="for DATASETS.COCO_FILES in --opts")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def box_outcomes(record: dict) -> list:
    """Per annotation of ``record``: ``(outcome, XYXY box to draw or None, reason)``, outcome one of
    ``kept`` / ``clipped`` (the clipped box) / ``dropped`` (the box as annotated, when drawable),
    by the rule training applies (:func:`deqdet.data.checks.clean_box`)."""
    outcomes = []
    for ann in record.get("annotations", []):
        try:
            xyxy = [
                float(v)
                for v in BoxMode.convert(
                    list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS
                )
            ]
        except (KeyError, TypeError, ValueError, AssertionError):
            outcomes.append((DROPPED, None, "malformed box"))
            continue
        box, reason = clean_box(xyxy, record["width"], record["height"])
        if box is None:
            outcomes.append((DROPPED, xyxy if all(map(math.isfinite, xyxy)) else None, reason))
        else:
            outcomes.append((CLIPPED if box != xyxy else KEPT, box, None))
    return outcomes


def draw(record: dict, metadata, scale: float = 1.0) -> tuple:
    """(RGB drawing, outcomes) of one record."""
    image = read_image(record["file_name"], format="RGB")
    names = metadata.get("thing_classes", None)
    visualizer = Visualizer(image, metadata, scale=scale)
    outcomes = box_outcomes(record)
    for ann, (outcome, box, reason) in zip(record.get("annotations", []), outcomes):
        if box is None:
            continue
        name = names[ann["category_id"]] if names else str(ann["category_id"])
        # the label above the box, towards the image's middle so that it stays inside
        left = box[0] < record["width"] / 2
        anchor, align = ((box[0], box[1]), "left") if left else ((box[2], box[1]), "right")
        if outcome == DROPPED:
            visualizer.draw_box(box, edge_color="red", line_style="--")
            visualizer.draw_text(
                f"{name}: dropped ({reason})", anchor, color="red", horizontal_alignment=align
            )
        else:
            visualizer.draw_box(box, edge_color="orange" if outcome == CLIPPED else "lime")
            label = f"{name} (clipped)" if outcome == CLIPPED else name
            visualizer.draw_text(label, anchor, horizontal_alignment=align)
    return visualizer.output.get_image(), outcomes


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")  # the checks' warnings, on stderr
    try:
        build_config(args.config_file, args.opts)  # registers DATASETS.COCO_FILES
        records = load_dataset(args.dataset)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    metadata = MetadataCatalog.get(args.dataset)
    os.makedirs(args.output, exist_ok=True)
    drawn = 0
    for record in records[: args.num]:
        problem = image_problem(record)
        if problem:
            print(f"skipped {record['file_name']}: {problem}", file=sys.stderr)
            continue
        picture, outcomes = draw(record, metadata, args.scale)
        target = os.path.join(
            args.output, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        )
        cv2.imwrite(target, picture[:, :, ::-1])
        counts = {kind: sum(o[0] == kind for o in outcomes) for kind in (KEPT, CLIPPED, DROPPED)}
        boxes = count(len(outcomes), "box")
        print(f"{target}: {boxes}, {counts[CLIPPED]} clipped, {counts[DROPPED]} dropped")
        drawn += 1
    print(f"{count(drawn, 'image')} of {args.dataset!r} drawn into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
