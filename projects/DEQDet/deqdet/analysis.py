"""What an evaluation's errors are: per-class AP from COCOeval's precision array, and each
detection classified against the ground truth (as the error analyses of the COCO toolkit and
TIDE do) with a confusion matrix (as mmdetection's ``confusion_matrix``).

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
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["ERROR_KINDS", "ErrorBreakdown", "classify_detections", "per_class_ap"]

ERROR_KINDS = ("correct", "duplicate", "class confusion", "localisation", "background", "missed")


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
    class), and the (K + 1) x (K + 1) confusion matrix: rows the ground-truth class, the last row
    detections of no object (background, localisation); columns the detected class, the last
    column boxes no detection found. Duplicates are counted only in ``counts``."""

    num_classes: int
    counts: Counter = field(default_factory=Counter)
    per_class: Dict[int, Counter] = field(default_factory=dict)
    confusion: np.ndarray = None

    def __post_init__(self):
        self.confusion = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)

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
    background = breakdown.num_classes
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
            breakdown.confusion[background, cls] += 1
        breakdown.add(kind, cls)
        kinds[d] = kind
    for g in np.where(~taken)[0]:
        breakdown.add("missed", int(gt_classes[g]))
        breakdown.confusion[gt_classes[g], background] += 1
    return kinds
