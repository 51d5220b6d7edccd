"""Set criterion: per supervised prediction, Hungarian matching then focal, L1 and GIoU losses."""

from typing import Dict, List

import torch
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torchvision.ops import generalized_box_iou_loss

from .matcher import HungarianMatcher

__all__ = ["SetCriterion"]


class SetCriterion:
    """Losses of any list of predictions ``[{"logits": (B, N, K), "boxes": (B, N, 4)}, ...]``.

    Each prediction is matched on its own. With ``num_boxes`` the number of ground-truth boxes
    in the batch averaged over workers (at least 1)::

        loss_cls  = w_cls  * sum(focal(logits, one-hot of matched labels)) / num_boxes   # all queries
        loss_l1   = w_l1   * sum(|boxes / whwh - gt / whwh|) / num_boxes                 # matched
        loss_giou = w_giou * sum(1 - GIoU(boxes, gt)) / num_boxes                       # matched

    Images without objects contribute only negatives to ``loss_cls``. Keys are ``s{i}_loss_*``.
    """

    def __init__(self, matcher: HungarianMatcher, class_weight: float, l1_weight: float, giou_weight: float,
                 alpha: float, gamma: float):
        self.matcher = matcher
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma

    @staticmethod
    def num_boxes(targets: List[dict], device) -> float:
        """Ground-truth boxes per worker, averaged over workers, at least 1."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
            count = count / comm.get_world_size()
        return max(count.item(), 1.0)

    def single(self, logits, boxes, targets: List[dict], num_boxes: float) -> Dict[str, torch.Tensor]:
        """Losses of one prediction: logits (B, N, K), boxes (B, N, 4)."""
        matches = self.matcher.match_batch(logits.detach(), boxes.detach(), targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        gt_labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, matches)])
        gt_boxes = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, matches)]).to(boxes.dtype)
        whwh = torch.stack([t["whwh"] for t in targets]).to(boxes.dtype)[batch_idx]

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, gt_labels] = 1.0
        loss_cls = sigmoid_focal_loss(logits, onehot, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        matched = boxes[batch_idx, query_idx]
        loss_l1 = (matched / whwh - gt_boxes / whwh).abs().sum()
        loss_giou = generalized_box_iou_loss(matched, gt_boxes, reduction="sum")
        return {
            "loss_cls": self.class_weight * loss_cls / num_boxes,
            "loss_l1": self.l1_weight * loss_l1 / num_boxes,
            "loss_giou": self.giou_weight * loss_giou / num_boxes,
        }

    def __call__(self, predictions: List[Dict[str, torch.Tensor]], targets: List[dict]) -> Dict[str, torch.Tensor]:
        """predictions: supervised outputs in order; targets: per image ``{"labels" (M,) int64,
        "boxes" (M, 4) xyxy pixels, "whwh" (4,) image size}``."""
        num_boxes = self.num_boxes(targets, predictions[0]["logits"].device)
        losses = {}
        for i, pred in enumerate(predictions):
            for name, value in self.single(pred["logits"], pred["boxes"], targets, num_boxes).items():
                losses[f"s{i}_{name}"] = value
        return losses
