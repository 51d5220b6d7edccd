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

How much AP each kind of error costs is measured as TIDE does, by fixing it with the ground truth
and evaluating again (:data:`ORACLE_FIXES`, applied to every output by :class:`OracleFixEvaluator`):
``classes`` gives each detection the class of the box it overlaps, ``boxes`` moves each detection onto
the box of its class it overlaps, ``ranking`` scores each detection by its IoU with its class's boxes.

Whether the scores pick the best-placed of the boxes an answer has (:class:`FirstHitEvaluator`): per
object, the IoU of its *first hit* (the highest-scored detection of its class overlapping it by IoU >=
0.5, the one COCO's matching counts first) against the best IoU any detection of its class reaches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, Instances, pairwise_iou

from .evaluation import OutputKeyEvaluator

__all__ = [
    "ERROR_KINDS", "ErrorBreakdown", "FirstHitEvaluator", "ORACLE_FIXES", "OracleFixEvaluator",
    "classify_detections", "first_hits", "fix_boxes", "fix_classes", "fix_ranking", "per_class_ap",
]

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


def _ious(instances: Instances, gt_boxes: torch.Tensor) -> torch.Tensor:
    """(D, G) IoU of the detections with the ground-truth boxes (XYXY (G, 4))."""
    return pairwise_iou(instances.pred_boxes, Boxes(gt_boxes.to(instances.pred_boxes.tensor).reshape(-1, 4)))


def fix_classes(instances: Instances, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, *,
                iou: float = 0.5) -> Instances:
    """A copy in which each detection with IoU >= ``iou`` with some ground-truth box (G, 4), of any class
    (G,), takes the class of the box it overlaps most: what classification errors cost."""
    fixed = instances[:]
    if len(instances) and len(gt_boxes):
        best, index = _ious(instances, gt_boxes).max(dim=1)
        gt_classes = gt_classes.to(best.device)
        fixed.pred_classes = torch.where(best >= iou, gt_classes[index], instances.pred_classes)
    return fixed


def fix_boxes(instances: Instances, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, *,
              background_iou: float = 0.1) -> Instances:
    """A copy in which, highest score first, each detection whose most-overlapped ground-truth box of its
    own class has IoU >= ``background_iou`` and was not taken by a higher-scored detection gets that box's
    coordinates: what localisation errors cost (the duplicates it does not make)."""
    fixed = instances[:]
    if not (len(instances) and len(gt_boxes)):
        return fixed
    gt_boxes, gt_classes = gt_boxes.to(instances.pred_boxes.tensor), gt_classes.to(instances.pred_classes)
    same = _ious(instances, gt_boxes) * (instances.pred_classes[:, None] == gt_classes[None, :])
    best, index = same.max(dim=1)
    boxes, taken = instances.pred_boxes.tensor.clone(), set()
    for d in instances.scores.argsort(descending=True).tolist():
        g = int(index[d])
        if best[d] >= background_iou and g not in taken:
            taken.add(g)
            boxes[d] = gt_boxes[g]
    fixed.pred_boxes = Boxes(boxes)
    return fixed


def fix_ranking(instances: Instances, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> Instances:
    """A copy scored by each detection's highest IoU with a ground-truth box of its class (0 if none): the
    AP of the same boxes and classes ranked perfectly, i.e. what the scores cost."""
    fixed = instances[:]
    if not (len(instances) and len(gt_boxes)):
        fixed.scores = torch.zeros_like(instances.scores)
        return fixed
    gt_classes = gt_classes.to(instances.pred_classes)
    same = _ious(instances, gt_boxes) * (instances.pred_classes[:, None] == gt_classes[None, :])
    fixed.scores = same.max(dim=1).values.to(instances.scores.dtype)
    return fixed


# name -> fix(instances, gt_boxes (G, 4) XYXY, gt_classes (G,)) -> fixed copy of instances
ORACLE_FIXES: Dict[str, Callable[[Instances, torch.Tensor, torch.Tensor], Instances]] = {
    "classes": fix_classes, "boxes": fix_boxes, "ranking": fix_ranking,
}


class OracleFixEvaluator(OutputKeyEvaluator):
    """Runs ``evaluator`` on each output's ``instances`` with ``fix`` (one of :data:`ORACLE_FIXES`) applied
    against ``ground_truth`` (``image_id`` -> (boxes (G, 4) XYXY in the original image, classes (G,)),
    the boxes the detections are in) and reports its tasks with ``prefix`` in front."""

    def __init__(self, evaluator, fix: Callable, ground_truth: Dict, prefix: str):
        super().__init__(evaluator, key="instances", prefix=prefix)
        self.fix, self.ground_truth = fix, ground_truth

    def process(self, inputs, outputs):
        fixed = [{"instances": self.fix(out["instances"], *self.ground_truth[x["image_id"]])}
                 for x, out in zip(inputs, outputs)]
        self.evaluator.process(inputs, fixed)


def first_hits(instances: Instances, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, *,
               iou: float = 0.5) -> torch.Tensor:
    """(G, 2) per ground-truth box (G, 4) of class (G,): the IoU of its first hit (the highest-scored
    detection of its class with IoU >= ``iou``; 0 if none) and the best IoU of any detection of its class."""
    if not len(gt_boxes):
        return torch.zeros(0, 2)
    if not len(instances):
        return torch.zeros(len(gt_boxes), 2)
    gt_classes = gt_classes.to(instances.pred_classes)
    same = _ious(instances, gt_boxes) * (instances.pred_classes[:, None] == gt_classes[None, :])  # (D, G)
    ranked = same[instances.scores.argsort(descending=True)]
    hit = ranked >= iou
    first = torch.where(hit.any(dim=0), ranked.gather(0, hit.float().argmax(dim=0, keepdim=True))[0], 0.0)
    return torch.stack([first, same.max(dim=0).values], dim=1).float().cpu()


class FirstHitEvaluator(DatasetEvaluator):
    """The :func:`first_hits` of every object of ``ground_truth`` (``image_id`` -> (boxes (G, 4) XYXY in the
    original image, classes (G,))) in the outputs' ``instances``, summed up as task ``first_hit``: the
    share of objects hit, the mean IoU of the first hits, the shares of objects whose first hit has IoU
    >= 0.75 / 0.9, and the mean best IoU of any detection of the object's class (the boxes a perfect
    ranking would pick first)."""

    def __init__(self, ground_truth: Dict):
        self.ground_truth = ground_truth

    def reset(self):
        self._hits = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            self._hits.append(first_hits(out["instances"], *self.ground_truth[x["image_id"]]))

    def evaluate(self):
        hits = torch.cat(self._hits) if self._hits else torch.zeros(0, 2)
        found, first, best = hits[:, 0] > 0, hits[:, 0], hits[:, 1]
        share = lambda x: float(x.float().mean() * 100)  # noqa: E731
        return {"first_hit": {
            "objects hit, %": share(found), "first hit's mean IoU": float(first[found].mean()),
            "first hit IoU >= 0.75, %": share(first >= 0.75), "first hit IoU >= 0.9, %": share(first >= 0.9),
            "best detection's mean IoU": float(best[found].mean()),
        }}
