#!/usr/bin/env python
"""Draw the detections an evaluation saved (``coco_instances_results.json``) next to the ground
truth, image by image, as Detectron2's ``tools/visualize_json_results.py``: left the detections
with a score of at least ``--confidence-threshold``, right the ground truth as evaluation sees it
(the project's checks applied: dropped boxes left out, clipped ones clipped).

    .venv/bin/python tools/visualize_results.py \\
        --results output/demo/inference/shapes_val/coco_instances_results.json \\
        --dataset shapes_val --output output/demo/results --num 20

Your own dataset: ``--config-file X.yaml --opts DATASETS.COCO_FILES "('mine_val=val.json:images',)"``
registers it as training does. Images the checks refuse are named and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.visualizer import Visualizer

from deqdet.data.loading import check_dataset, load_dataset
from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.quiet import silence_known_warnings


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", required=True, help="coco_instances_results.json of an evaluation")
    parser.add_argument("--dataset", required=True, help="the evaluated dataset's name")
    parser.add_argument("--output", required=True, help="folder for the drawings (one PNG per image)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="smallest score drawn")
    parser.add_argument("--num", type=int, help="draw only the first NUM images")
    parser.add_argument("--config-file", default="", metavar="FILE", help="for DATASETS.COCO_FILES in --opts")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def read_results(path: str, id_map: dict) -> dict:
    """``{image_id: [result, ...]}`` of a COCO results file whose category ids are mapped to the
    dataset's contiguous ones (``category_id`` replaced).

    Raises:
        UserInputError: unreadable file, or a category id the dataset does not have.
    """
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserInputError(f"--results {path}: {e}") from e
    by_image = defaultdict(list)
    for result in results:
        if result["category_id"] not in id_map:
            raise UserInputError(
                f"--results {path}: category_id {result['category_id']} is not a category of "
                f"the dataset ({sorted(id_map)})"
            )
        by_image[result["image_id"]].append({**result, "category_id": id_map[result["category_id"]]})
    return by_image


def as_instances(results: list, image_size) -> Instances:
    """COCO results (XYWH boxes, contiguous ``category_id``) of one image as ``Instances``."""
    instances = Instances(image_size)
    boxes = [BoxMode.convert(r["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for r in results]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    instances.pred_classes = torch.tensor([r["category_id"] for r in results], dtype=torch.int64)
    return instances


def draw(record: dict, results: list, metadata, threshold: float) -> np.ndarray:
    """RGB: the detections (score >= ``threshold``) left, the ground truth right."""
    image = read_image(record["file_name"], format="RGB")
    predictions = as_instances([r for r in results if r["score"] >= threshold], image.shape[:2])
    left = Visualizer(image, metadata).draw_instance_predictions(predictions).get_image()
    right = Visualizer(image, metadata).draw_dataset_dict(record).get_image()
    return np.concatenate([left, right], axis=1)


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    try:
        build_config(args.config_file, args.opts)  # registers DATASETS.COCO_FILES
        records = check_dataset(args.dataset, load_dataset(args.dataset), skip_bad_images=True)
        metadata = MetadataCatalog.get(args.dataset)
        id_map = metadata.get("thing_dataset_id_to_contiguous_id") or {}
        by_image = read_results(args.results, id_map)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    for record in records[: args.num]:
        target = os.path.join(
            args.output, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        )
        drawn = draw(record, by_image.get(record["image_id"], []), metadata, args.confidence_threshold)
        cv2.imwrite(target, drawn[:, :, ::-1])
    print(
        f"{len(records[: args.num])} images drawn into {args.output} (left: detections with score >= "
        f"{args.confidence_threshold}; right: ground truth)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
