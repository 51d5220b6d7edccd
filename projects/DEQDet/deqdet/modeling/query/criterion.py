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

    Each prediction is matched on its own. With ``num_matched`` the official normaliser (the number
    of matched queries, see :meth:`num_matched`)::

        loss_cls  = w_cls  * sum(focal(logits, one-hot of matched labels)) / num_matched   # all queries
        loss_l1   = w_l1   * sum(|boxes / whwh - gt / whwh|) / num_matched                 # matched
        loss_giou = w_giou * sum(1 - GIoU(boxes, gt)) / num_matched                       # matched

    Images without objects contribute only negatives to ``loss_cls``. Keys are ``s{i}_loss_*``.
    """

    def __init__(self, matcher: HungarianMatcher, class_weight: float, l1_weight: float, giou_weight: float,
                 alpha: float, gamma: float):
        self.matcher = matcher
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma

    @staticmethod
    def num_matched(targets: List[dict], num_queries: int, device) -> float:
        """Matched queries per worker, ``sum over images of min(#gt, num_queries)`` (one-to-one
        matching), averaged over workers, as the official ``reduce_mean(num_pos)``. A batch without
        objects on every worker gives 1 (the official ``avg_factor + float32 eps`` would divide the
        negatives' focal loss by about 1.2e-7)."""
        count = torch.tensor(float(sum(min(len(t["labels"]), num_queries) for t in targets)), device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
            count = count / comm.get_world_size()
        value = count.item()
        return value if value > 0 else 1.0

    def single(self, logits, boxes, targets: List[dict], num_matched: float) -> Dict[str, torch.Tensor]:
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
            "loss_cls": self.class_weight * loss_cls / num_matched,
            "loss_l1": self.l1_weight * loss_l1 / num_matched,
            "loss_giou": self.giou_weight * loss_giou / num_matched,
        }

    def __call__(self, predictions: List[Dict[str, torch.Tensor]], targets: List[dict]) -> Dict[str, torch.Tensor]:
        """predictions: supervised outputs in order; targets: per image ``{"labels" (M,) int64,
        "boxes" (M, 4) xyxy pixels, "whwh" (4,) image size}``."""
        logits = predictions[0]["logits"]
        num_matched = self.num_matched(targets, logits.shape[1], logits.device)
        losses = {}
        for i, pred in enumerate(predictions):
            for name, value in self.single(pred["logits"], pred["boxes"], targets, num_matched).items():
                losses[f"s{i}_{name}"] = value
        return losses
