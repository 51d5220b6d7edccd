"""Set criterion: per supervised prediction, Hungarian matching then focal, L1 and GIoU losses."""

from typing import Dict, List, NamedTuple

import torch
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torchvision.ops import generalized_box_iou_loss

from .matcher import HungarianMatcher

__all__ = ["Matched", "SetCriterion"]


class Matched(NamedTuple):
    """The Hungarian-matched (query, ground truth) pairs of a batch, R of them."""

    batch: torch.Tensor  #: (R,) image index
    query: torch.Tensor  #: (R,) query index
    labels: torch.Tensor  #: (R,) ground-truth class
    boxes: torch.Tensor  #: (R, 4) ground-truth box, xyxy pixels, in the predicted boxes' dtype


class SetCriterion:
    """Losses of any list of predictions ``[{"logits": (B, N, K), "boxes": (B, N, 4)}, ...]``.

    Each prediction is matched on its own. With ``num_matched`` the official normaliser (the number
    of matched queries, see :meth:`num_matched`)::

        loss_cls  = w_cls  * sum(focal(logits, one-hot of matched labels)) / num_matched   # all queries
        loss_l1   = w_l1   * sum(|boxes / whwh - gt / whwh|) / num_matched                 # matched
        loss_giou = w_giou * sum(1 - GIoU(boxes, gt)) / num_matched                       # matched

    Images without objects contribute only negatives to ``loss_cls``. Keys are ``s{i}_loss_*``.
    Subclasses change the classification target (:meth:`classification_loss`) or add losses
    (:meth:`losses_of`).
    """

    def __init__(self, matcher: HungarianMatcher, class_weight: float, l1_weight: float, giou_weight: float,
                 alpha: float, gamma: float):
        self.matcher = matcher
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "SetCriterion":
        """The Hungarian matcher and the criterion with the ``MODEL.QUERY`` loss (= matching cost)
        weights; ``kwargs`` go to the constructor."""
        q = cfg.MODEL.QUERY
        weights = dict(class_weight=q.CLASS_WEIGHT, l1_weight=q.L1_WEIGHT, giou_weight=q.GIOU_WEIGHT,
                       alpha=q.FOCAL_ALPHA, gamma=q.FOCAL_GAMMA)
        return cls(HungarianMatcher(**weights, matches_per_gt=q.MATCHES_PER_GT), **weights, **kwargs)

    @staticmethod
    def num_matched(targets: List[dict], num_queries: int, device, matches_per_gt: int = 1) -> float:
        """Matched queries per worker, ``sum over images of min(k * #gt, num_queries)`` (k =
        ``matches_per_gt``, 1 for one-to-one matching), averaged over workers, as the official
        ``reduce_mean(num_pos)``. A batch without objects on every worker gives 1 (the official
        ``avg_factor + float32 eps`` would divide the negatives' focal loss by about 1.2e-7)."""
        count = torch.tensor(
            float(sum(min(matches_per_gt * len(t["labels"]), num_queries) for t in targets)), device=device
        )
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
            count = count / comm.get_world_size()
        value = count.item()
        return value if value > 0 else 1.0

    def match(self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[dict]) -> Matched:
        """The matched pairs of one prediction: logits (B, N, K), boxes (B, N, 4)."""
        matches = self.matcher.match_batch(logits.detach(), boxes.detach(), targets)
        return Matched(
            torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)]),
            torch.cat([q for q, _ in matches]),
            torch.cat([t["labels"][g] for t, (_, g) in zip(targets, matches)]),
            torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, matches)]).to(boxes.dtype),
        )

    def classification_loss(
        self, logits: torch.Tensor, boxes: torch.Tensor, matched: Matched
    ) -> torch.Tensor:
        """Summed sigmoid focal loss of logits (B, N, K) against the one-hot of the matched labels."""
        target = torch.zeros_like(logits)
        target[matched.batch, matched.query, matched.labels] = 1.0
        return sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="sum")

    def single(self, prediction: Dict[str, torch.Tensor], targets: List[dict],
               num_matched: float) -> Dict[str, torch.Tensor]:
        """The losses of one prediction, matched on its own, divided by ``num_matched``."""
        matched = self.match(prediction["logits"], prediction["boxes"], targets)
        return self.losses_of(prediction, targets, matched, num_matched)

    def losses_of(self, prediction: Dict[str, torch.Tensor], targets: List[dict], matched: Matched,
                  num_matched: float) -> Dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_l1`` and ``loss_giou`` of one prediction given its matched pairs."""
        logits, boxes = prediction["logits"], prediction["boxes"]
        whwh = torch.stack([t["whwh"] for t in targets]).to(boxes.dtype)[matched.batch]  # (R, 4)
        reg = boxes[matched.batch, matched.query]
        return {
            "loss_cls": self.class_weight * self.classification_loss(logits, boxes, matched) / num_matched,
            "loss_l1": self.l1_weight * (reg / whwh - matched.boxes / whwh).abs().sum() / num_matched,
            "loss_giou": self.giou_weight * generalized_box_iou_loss(reg, matched.boxes, reduction="sum")
            / num_matched,
        }

    def __call__(
        self, predictions: List[Dict[str, torch.Tensor]], targets: List[dict]
    ) -> Dict[str, torch.Tensor]:
        """predictions: supervised outputs in order; targets: per image ``{"labels" (M,) int64,
        "boxes" (M, 4) xyxy pixels, "whwh" (4,) image size}``."""
        logits = predictions[0]["logits"]
        num_matched = self.num_matched(targets, logits.shape[1], logits.device, self.matcher.matches_per_gt)
        losses = {}
        for i, pred in enumerate(predictions):
            for name, value in self.single(pred, targets, num_matched).items():
                losses[f"s{i}_{name}"] = value
        return losses
