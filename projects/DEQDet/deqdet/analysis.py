"""What an evaluation's errors are: per-class AP from COCOeval's precision array, each detection
classified against the ground truth (as the error analyses of the COCO toolkit and TIDE do) with a
confusion matrix (as mmdetection's ``confusion_matrix``), and the images ranked by F1 (as
mmdetection's ``analyze_results`` ranks them by AP).

A detection (score >= a threshold, highest first in each image) is:

- ``correct``: IoU >= ``iou`` with a box of its class that no higher-scored detection took;
- ``duplicate``: IoU >= ``iou`` with a box of its class, all such boxes already taken;
- ``class confusion``: IoU >= ``iou`` with a box of another class only;
- ``localisation``: its best IoU with a box of its class is in [``background_iou``, ``iou``);
- ``background``: none of the above.

A ground-truth box that no detection took is ``missed``. Crowd boxes (``iscrowd``) are not
counted either way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = [
    "CONFUSION_ROWS",
    "ERROR_KINDS",
    "ErrorBreakdown",
    "ImageScore",
    "best_and_worst",
    "classify_detections",
    "per_class_ap",
]

ERROR_KINDS = ("correct", "duplicate", "class confusion", "localisation", "background", "missed")
# the confusion matrix's rows after the K ground-truth classes: detections of no object, by kind
CONFUSION_ROWS = ("localisation", "background")


def per_class_ap(precision: np.ndarray) -> np.ndarray:
    """COCOeval's ``eval["precision"]`` (T IoU thresholds, R recalls, K classes, A areas, M max
    detections) -> (K, 3) AP, AP50, AP75 in percent (all areas, most detections; NaN for a class
    without ground truth)."""
    def mean(p):
        p = p[p > -1]
        return float(p.mean() * 100) if p.size else float("nan")

    return np.array([[mean(precision[:, :, k, 0, -1]), mean(precision[0, :, k, 0, -1]),
                      mean(precision[5, :, k, 0, -1])] for k in range(precision.shape[2])])


@dataclass
class ErrorBreakdown:
    """Counts of :data:`ERROR_KINDS`, overall and per class (the detection's class; a missed box's
    class), and the (K + 2) x (K + 1) confusion matrix: rows the ground-truth class, then the
    detections of no object, as :data:`CONFUSION_ROWS` (``localisation``, ``background``); columns
    the detected class, the last column boxes no detection found. Every count of the table is a
    part of the matrix: for class k, ``correct`` is ``confusion[k, k]``, ``class confusion`` the
    rest of column k over the ground-truth rows, ``localisation`` and ``background`` column k of
    their rows, ``missed`` row k of the last column. Duplicates are counted only in ``counts``."""

    num_classes: int
    counts: Counter = field(default_factory=Counter)
    per_class: Dict[int, Counter] = field(default_factory=dict)
    confusion: np.ndarray = None

    def __post_init__(self):
        self.confusion = np.zeros((self.num_classes + len(CONFUSION_ROWS), self.num_classes + 1), np.int64)

    def add(self, kind: str, cls: int) -> None:
        self.counts[kind] += 1
        self.per_class.setdefault(cls, Counter())[kind] += 1


def classify_detections(breakdown: ErrorBreakdown, gt_boxes: np.ndarray, gt_classes: Sequence[int],
                        det_boxes: np.ndarray, det_classes: Sequence[int], det_scores: Sequence[float], *,
                        iou: float = 0.5, background_iou: float = 0.1) -> List[str]:
    """Classify one image's detections (XYXY (D, 4), classes, scores) against its non-crowd
    ground truth (XYXY (G, 4), classes) into ``breakdown``; returns each detection's kind, in the
    given order."""
    order = np.argsort(-np.asarray(det_scores, np.float64), kind="stable")
    ious = pairwise_iou(Boxes(torch.as_tensor(det_boxes, dtype=torch.float32).reshape(-1, 4)),
                        Boxes(torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4))).numpy()
    gt_classes, taken = np.asarray(gt_classes, np.int64), np.zeros(len(gt_boxes), bool)
    missed_column = breakdown.num_classes
    kinds = [""] * len(det_boxes)
    for d in order:
        cls = int(det_classes[d])
        same = gt_classes == cls
        candidates = np.where(same & ~taken & (ious[d] >= iou))[0]
        if candidates.size:
            g = candidates[np.argmax(ious[d][candidates])]
            taken[g] = True
            kind = "correct"
            breakdown.confusion[cls, cls] += 1
        elif np.any(same & (ious[d] >= iou)):
            kind = "duplicate"
        elif np.any(~same & (ious[d] >= iou)):
            kind = "class confusion"
            other = np.where(~same & (ious[d] >= iou))[0]
            breakdown.confusion[gt_classes[other[np.argmax(ious[d][other])]], cls] += 1
        else:
            kind = "localisation" if np.any(same & (ious[d] >= background_iou)) else "background"
            breakdown.confusion[breakdown.num_classes + CONFUSION_ROWS.index(kind), cls] += 1
        breakdown.add(kind, cls)
        kinds[d] = kind
    for g in np.where(~taken)[0]:
        breakdown.add("missed", int(gt_classes[g]))
        breakdown.confusion[gt_classes[g], missed_column] += 1
    return kinds


@dataclass(frozen=True)
class ImageScore:
    """One image's detections at IoU 0.5 (:func:`classify_detections`): ``correct`` ones, the
    other detections (``false_positives``: duplicates, confusions, localisation, background) and
    the ``missed`` boxes."""

    image_id: int
    file_name: str
    correct: int
    false_positives: int
    missed: int

    @classmethod
    def of(cls, image_id: int, file_name: str, kinds: Sequence[str], num_gt: int) -> "ImageScore":
        """From :func:`classify_detections`' kinds of the image's detections and its box count."""
        correct = sum(kind == "correct" for kind in kinds)
        return cls(image_id, file_name, correct, len(kinds) - correct, num_gt - correct)

    @property
    def f1(self) -> float:
        """``2 correct / (2 correct + false positives + missed)``: 1 for an image whose every box
        is found with no other detection, 0 when none is found."""
        return 2 * self.correct / (2 * self.correct + self.false_positives + self.missed)


def best_and_worst(scores: Sequence[ImageScore], k: int) -> Tuple[List[ImageScore], List[ImageScore]]:
    """The ``k`` images of highest F1 (ties: more correct detections first) and the ``k`` of lowest
    F1 (ties: more errors first), each list best / worst first; ties beyond that by image id. Images
    with neither ground truth nor detections have no F1 and are not ranked."""
    ranked = [s for s in scores if s.correct + s.false_positives + s.missed]
    best = sorted(ranked, key=lambda s: (-s.f1, -s.correct, s.image_id))[:k]
    worst = sorted(ranked, key=lambda s: (s.f1, -(s.false_positives + s.missed), s.image_id))[:k]
    return best, worst
