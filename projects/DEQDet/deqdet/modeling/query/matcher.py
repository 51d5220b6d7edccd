"""Hungarian matching of queries to ground-truth boxes (focal + L1 + GIoU cost), one-to-one or one-to-k."""

from typing import List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

__all__ = ["HungarianMatcher", "focal_cost"]


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float, eps: float = 1e-12):
    """(N, K) logits, (M,) labels -> (N, M) focal cost: the focal loss of predicting the gt class
    minus that of not predicting it."""
    prob = logits.sigmoid()[:, labels]
    pos = -alpha * (1 - prob) ** gamma * (prob + eps).log()
    neg = -(1 - alpha) * prob**gamma * (1 - prob + eps).log()
    return pos - neg


class HungarianMatcher:
    """One-to-one assignment minimising ``w_cls * focal + w_l1 * L1 + w_giou * (-GIoU)``.

    L1 is on boxes normalised by the image size (xyxy / whwh); GIoU on pixel boxes.

    With ``matches_per_gt`` k > 1 the assignment is one-to-k (H-DETR's one-to-many matching): each
    ground truth is repeated k times in the cost matrix, so up to k queries match it and
    ``min(N, k * M)`` queries are positive. Its duplicates are meant to be removed by a test-time NMS.
    """

    def __init__(self, class_weight: float, l1_weight: float, giou_weight: float, alpha: float, gamma: float,
                 matches_per_gt: int = 1):
        if matches_per_gt < 1:
            raise ValueError(f"MODEL.QUERY.MATCHES_PER_GT must be at least 1, got {matches_per_gt}")
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma
        self.matches_per_gt = matches_per_gt

    @torch.no_grad()
    def cost(self, logits, boxes, gt_labels, gt_boxes, whwh) -> torch.Tensor:
        """(N, K) logits, (N, 4) boxes, (M,) labels, (M, 4) gt boxes, (4,) image whwh -> (N, M) cost."""
        l1 = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)
        giou = generalized_box_iou(boxes, gt_boxes)
        cls = focal_cost(logits, gt_labels, self.alpha, self.gamma)
        return self.class_weight * cls + self.l1_weight * l1 - self.giou_weight * giou

    @torch.no_grad()
    def __call__(self, logits, boxes, gt_labels, gt_boxes, whwh) -> Tuple[torch.Tensor, torch.Tensor]:
        """One image -> (query indices, gt indices), each (min(N, k * M),) int64; a gt index may repeat
        up to k times."""
        if len(gt_labels) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        cost = self.cost(logits.float(), boxes.float(), gt_labels, gt_boxes.float(), whwh.float())
        rows, cols = linear_sum_assignment(cost.repeat(1, self.matches_per_gt).cpu().numpy())
        cols = cols % len(gt_labels)  # column j of the repeated matrix is ground truth j mod M
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.int64, device=logits.device)  # noqa: E731
        return as_tensor(rows), as_tensor(cols)

    def match_batch(self, logits, boxes, targets: List[dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(B, N, K), (B, N, 4), B targets ``{"labels", "boxes", "whwh"}`` -> B index pairs."""
        return [self(lg, bx, t["labels"], t["boxes"], t["whwh"]) for lg, bx, t in zip(logits, boxes, targets)]
