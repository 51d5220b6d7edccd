"""The combined detector's set criterion: IoU-aware classification and the predicted-IoU loss, and the
detection score they train."""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou

from ..query.criterion import Matched, SetCriterion

__all__ = ["IoUAwareCriterion", "quality_focal_loss", "quality_logits"]

# the predicted-IoU loss also trains every unmatched query whose box overlaps a ground truth this much
OVERLAP_IOU = 0.5


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """GFL's quality focal loss, summed: logits and soft targets in [0, 1] of the same shape."""
    weight = (targets - logits.sigmoid()).abs().pow(gamma)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


def quality_logits(prediction: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (B, N, K) of a prediction's detection scores: its class ``logits``, or with predicted-IoU
    ``quality`` (B, N, 1) the logits of ``sqrt(sigmoid(logits) * sigmoid(quality))`` (IoU-aware RetinaNet's
    score with exponent 0.5)."""
    if "quality" not in prediction:
        return prediction["logits"]
    log_score = 0.5 * (F.logsigmoid(prediction["logits"]) + F.logsigmoid(prediction["quality"]))
    return log_score - torch.log(-torch.expm1(log_score))  # logit(s) = log s - log(1 - s)


def _matched_iou(boxes: torch.Tensor, batch: torch.Tensor, query: torch.Tensor, gt: torch.Tensor):
    """(R,) IoU of the detached boxes (B, N, 4) at (batch, query) with their ground truth gt (R, 4)."""
    return matched_pairwise_iou(Boxes(boxes[batch, query].detach()), Boxes(gt))


class IoUAwareCriterion(SetCriterion):
    """:class:`SetCriterion` whose matched (query, class) target is the IoU of the query's box with its
    ground truth (detached) instead of 1, with GFL's quality focal loss
    ``BCE(logits, t) * |t - sigmoid(logits)|^gamma`` (no alpha), so that a box the decoder refines closer
    to its object is trained to score higher.

    ``quality_weight`` > 0 also trains the stages' predicted-IoU branch (``"quality"`` logits (B, N, 1) in
    the prediction) on the matched queries and every query overlapping an object by IoU >= ``OVERLAP_IOU``:
    ``loss_quality = w_quality * sum(BCE(quality, IoU(box, gt))) / R * (matched / num_matched)`` (box
    detached), the scale of the box losses.
    """

    def __init__(self, *args, quality_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if quality_weight < 0:
            raise ValueError(f"MODEL.QUERY.QUALITY_WEIGHT must be >= 0, got {quality_weight}")
        self.quality_weight = quality_weight

    def classification_loss(
        self, logits: torch.Tensor, boxes: torch.Tensor, matched: Matched
    ) -> torch.Tensor:
        target = torch.zeros_like(logits)
        iou = _matched_iou(boxes, matched.batch, matched.query, matched.boxes)
        target[matched.batch, matched.query, matched.labels] = iou.to(target.dtype)
        return quality_focal_loss(logits, target, self.gamma)

    def losses_of(self, prediction: Dict[str, torch.Tensor], targets: List[dict], matched: Matched,
                  num_matched: float) -> Dict[str, torch.Tensor]:
        quality = prediction.get("quality")
        if (quality is None) != (self.quality_weight == 0):
            raise ValueError(f"MODEL.QUERY.QUALITY_WEIGHT is {self.quality_weight} but the decoder's "
                             f"prediction {'has no' if quality is None else 'has a'} quality branch")
        losses = super().losses_of(prediction, targets, matched, num_matched)
        if quality is not None:
            boxes = prediction["boxes"]
            extra = self._overlapping(boxes.detach(), targets, matched)
            batch, query, _, gt = (torch.cat(pair) for pair in zip(matched, extra))
            iou = _matched_iou(boxes, batch, query, gt).to(quality.dtype)
            loss = F.binary_cross_entropy_with_logits(quality[batch, query, 0], iou, reduction="sum")
            scale = len(matched.query) / max(len(query), 1)  # a sum over the matched queries' scale
            losses["loss_quality"] = self.quality_weight * (loss * scale) / num_matched
        return losses

    @staticmethod
    def _overlapping(boxes: torch.Tensor, targets: List[dict], matched: Matched) -> Matched:
        """The unmatched queries whose box (B, N, 4) has IoU >= OVERLAP_IOU with a ground-truth box, each
        with the ground truth it overlaps most."""
        batch, queries, labels, gt = [], [], [], []
        for i, t in enumerate(targets):
            if not len(t["boxes"]):
                continue
            best, index = pairwise_iou(Boxes(boxes[i]), Boxes(t["boxes"].to(boxes.dtype))).max(dim=1)
            chosen = best >= OVERLAP_IOU
            chosen[matched.query[matched.batch == i]] = False
            query = chosen.nonzero().flatten()
            batch.append(torch.full_like(query, i))
            queries.append(query)
            labels.append(t["labels"][index[query]])
            gt.append(t["boxes"][index[query]].to(boxes.dtype))
        if not queries:
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            return Matched(empty, empty, empty, boxes.new_zeros(0, 4))
        return Matched(torch.cat(batch), torch.cat(queries), torch.cat(labels), torch.cat(gt))
