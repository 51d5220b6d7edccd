#!/usr/bin/env python
"""Per-class AP and what the errors are, for an evaluation's ``coco_instances_results.json``:
a per-class AP / AP50 / AP75 table (COCOeval, as the evaluation computes it), each detection with a
score of at least ``--score-threshold`` classified as correct, duplicate, class confusion,
localisation or background, the missed boxes counted (overall and per class;
:mod:`deqdet.analysis` defines each), a confusion matrix picture whose counts are those of the
table, and the ``--topk`` best and worst images by F1 at IoU 0.5 (as mmdetection's
``analyze_results``).

    .venv/bin/python tools/analyze_errors.py \\
        --results output/demo/inference/shapes_val/coco_instances_results.json \\
        --dataset shapes_val --output output/demo/errors

The ground truth is the evaluation's: the dataset's COCO file with the project's checks applied
(:func:`deqdet.evaluation.clean_ground_truth`). Your own dataset: ``--config-file X.yaml --opts
DATASETS.COCO_FILES "('mine_val=val.json:images',)"``. Writes ``confusion_matrix.png`` and
``errors.json`` into ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import matplotlib
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import coco_evaluation
from detectron2.structures import BoxMode
from pycocotools.coco import COCO
from tabulate import tabulate

from deqdet.analysis import (
    CONFUSION_ROWS,
    ERROR_KINDS,
    ErrorBreakdown,
    ImageScore,
    best_and_worst,
    classify_detections,
    per_class_ap,
)
from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.evaluation import clean_ground_truth, install_fast_coco_eval
from deqdet.quiet import silence_known_warnings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _xyxy(anns: list) -> np.ndarray:
    """(N, 4) float32 XYXY boxes of COCO annotations or results."""
    boxes = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in anns]
    return np.array(boxes, np.float32).reshape(-1, 4)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", required=True, help="coco_instances_results.json of an evaluation")
    parser.add_argument("--dataset", required=True, help="the evaluated dataset's name (with a COCO file)")
    parser.add_argument("--output", required=True, help="folder for confusion_matrix.png and errors.json")
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, help="detections classified (default 0.3)"
    )
    parser.add_argument(
        "--topk", type=int, default=10, help="how many best and worst images to list (default 10)"
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="for DATASETS.COCO_FILES in --opts")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def load_ground_truth_and_results(dataset: str, results_path: str):
    """(cleaned pycocotools ``COCO`` of ``dataset``, COCO of the results).

    Raises:
        UserInputError: the dataset has no COCO file, or the results are unreadable or empty.
    """
    json_file = MetadataCatalog.get(dataset).get("json_file")
    if not json_file:
        raise UserInputError(f"--dataset {dataset}: not registered with a COCO annotation file")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
        coco_gt = COCO(json_file)
        clean_ground_truth(coco_gt)
        try:
            with open(results_path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserInputError(f"--results {results_path}: {e}") from e
        if not results:
            raise UserInputError(f"--results {results_path}: no detections")
        unknown = {r["category_id"] for r in results} - set(coco_gt.getCatIds())
        if unknown:
            raise UserInputError(
                f"--results {results_path}: category ids {sorted(unknown)} are not in {json_file}"
            )
        coco_dt = coco_gt.loadRes(results)
    return coco_gt, coco_dt


def analyze(coco_gt, coco_dt, score_threshold: float):
    """(per-class AP array (K, 3), :class:`ErrorBreakdown`, class names, an :class:`ImageScore`
    per image)."""
    cat_ids = sorted(coco_gt.getCatIds())
    names = [coco_gt.cats[c]["name"] for c in cat_ids]
    index = {c: i for i, c in enumerate(cat_ids)}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = coco_evaluation.COCOeval_opt(coco_gt, coco_dt, "bbox")  # the evaluation's COCOeval
        evaluation.evaluate()
        evaluation.accumulate()
    breakdown = ErrorBreakdown(len(cat_ids))
    scores = []
    for image_id in coco_gt.getImgIds():
        gts = [a for a in coco_gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        dets = [d for d in coco_dt.imgToAnns.get(image_id, []) if d["score"] >= score_threshold]
        kinds = classify_detections(
            breakdown,
            _xyxy(gts),
            [index[a["category_id"]] for a in gts],
            _xyxy(dets),
            [index[d["category_id"]] for d in dets],
            [d["score"] for d in dets],
        )
        scores.append(ImageScore.of(image_id, coco_gt.imgs[image_id]["file_name"], kinds, len(gts)))
    return per_class_ap(evaluation.eval["precision"]), breakdown, names, scores


def plot_confusion(breakdown: ErrorBreakdown, names, path: str) -> None:
    """The confusion matrix as a picture: counts written, colour the fraction of the row."""
    matrix = breakdown.confusion
    rows, columns = [*names, *(f"({kind})" for kind in CONFUSION_ROWS)], [*names, "(missed)"]
    size = 1.2 + 0.55 * len(rows)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = ax.imshow(matrix / np.maximum(matrix.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(matrix):
        if n:
            ax.text(c, r, str(n), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("detected as")
    ax.set_ylabel("ground truth")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_table(scores) -> str:
    """A pipe table of :class:`ImageScore` rows."""
    rows = [[s.file_name, f"{s.f1:.2f}", s.correct, s.false_positives, s.missed] for s in scores]
    headers = ["image", "F1", "correct", "false positives", "missed"]
    return tabulate(  # file names as given: a name of digits stays text
        rows, headers=headers, tablefmt="pipe", disable_numparse=True, colalign=("left", *["right"] * 4)
    )


def _image_entry(score: ImageScore) -> dict:
    """An :class:`ImageScore` for errors.json."""
    return {**dataclasses.asdict(score), "f1": score.f1}


def main(argv=None) -> int:
    silence_known_warnings()
    install_fast_coco_eval()  # the COCOeval that the evaluation runs
    args = get_parser().parse_args(argv)
    try:
        build_config(args.config_file, args.opts)  # registers DATASETS.COCO_FILES
        coco_gt, coco_dt = load_ground_truth_and_results(args.dataset, args.results)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    ap, breakdown, names, scores = analyze(coco_gt, coco_dt, args.score_threshold)
    table = [
        [
            name,
            *(f"{v:.1f}" for v in ap[k]),
            *(breakdown.per_class.get(k, {}).get(kind, 0) for kind in ERROR_KINDS),
        ]
        for k, name in enumerate(names)
    ]
    table.append(
        ["all", *(f"{v:.1f}" for v in np.nanmean(ap, axis=0)), *(breakdown.counts[k] for k in ERROR_KINDS)]
    )
    print(tabulate(table, headers=["class", "AP", "AP50", "AP75", *ERROR_KINDS], tablefmt="pipe"))
    print(f"(detections with score >= {args.score_threshold}; IoU 0.5 for a match, 0.1 to count as "
          "localisation)")
    best, worst = best_and_worst(scores, args.topk)
    for title, listed in (("best", best), ("worst", worst)):
        print(f"\n{title} {len(listed)} images (F1 of the detections with score >= {args.score_threshold} "
              "at IoU 0.5):")
        print(image_table(listed))
    os.makedirs(args.output, exist_ok=True)
    plot_confusion(breakdown, names, os.path.join(args.output, "confusion_matrix.png"))
    with open(os.path.join(args.output, "errors.json"), "w") as f:
        json.dump(
            {
                "classes": names,
                "ap": ap.tolist(),
                "counts": dict(breakdown.counts),
                "per_class": {names[k]: dict(counts) for k, counts in sorted(breakdown.per_class.items())},
                "confusion_rows": [*names, *CONFUSION_ROWS],
                "confusion": breakdown.confusion.tolist(),
                "best_images": [_image_entry(s) for s in best],
                "worst_images": [_image_entry(s) for s in worst],
                "score_threshold": args.score_threshold,
            },
            f,
            indent=2,
        )
    written = [os.path.join(args.output, name) for name in ("confusion_matrix.png", "errors.json")]
    print(f"written: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
