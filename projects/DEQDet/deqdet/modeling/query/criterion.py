"""Set criterion: per supervised prediction, Hungarian matching then focal, L1 and GIoU losses."""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torchvision.ops import generalized_box_iou_loss

from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "LOSS_QUERIES", "CLS_TARGETS", "quality_focal_loss"]

CLS_TARGETS = ("one_hot", "iou")
# which queries a loss trains: the Hungarian-matched ones, or also every query overlapping an object
LOSS_QUERIES = ("matched", "overlapping")
# "overlapping": an unmatched query is also trained when its box overlaps a ground truth this much
OVERLAP_IOU = 0.5


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """GFL's quality focal loss, summed: logits and soft targets in [0, 1] of the same shape."""
    weight = (targets - logits.sigmoid()).abs().pow(gamma)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


class SetCriterion:
    """Losses of any list of predictions ``[{"logits": (B, N, K), "boxes": (B, N, 4)}, ...]``.

    Each prediction is matched on its own. With ``num_matched`` the official normaliser (the number
    of matched queries, see :meth:`num_matched`)::

        loss_cls  = w_cls  * sum(focal(logits, one-hot of matched labels)) / num_matched   # all queries
        loss_l1   = w_l1   * sum(|boxes / whwh - gt / whwh|) / num_matched                 # matched
        loss_giou = w_giou * sum(1 - GIoU(boxes, gt)) / num_matched                       # matched

    Images without objects contribute only negatives to ``loss_cls``. Keys are ``s{i}_loss_*``.

    ``cls_target`` "iou" makes the classification quality-aware: the matched (query, class) target is
    the IoU of the query's box with its ground truth (detached) instead of 1, and ``focal`` becomes the
    quality focal loss of GFL, ``BCE(logits, t) * |t - sigmoid(logits)|^gamma`` (no alpha), so that a box
    that the decoder refines closer to its object is trained to score higher.

    ``box_queries`` "overlapping" also regresses every unmatched query whose (detached) box has IoU >=
    ``OVERLAP_IOU`` with a ground-truth box, towards the box it overlaps most; ``loss_l1`` and
    ``loss_giou`` then average over all regressed queries (``sum / R * (matched / num_matched)``, the same
    scale per box as one-to-one). With one-to-one box losses only the best query per object learns to
    move its box, and on dense proposals its residual error is the smallest and least learnable one: the
    decoder's stages learn to leave their boxes where they are.

    ``cls_queries`` "overlapping" makes those same queries positives of ``loss_cls`` too, with the class of
    the ground truth each overlaps most (and, with ``cls_target`` "iou", their IoU as target): a one-to-many
    classification as in a Cascade R-CNN stage, so near-duplicates are no longer trained as background
    and the decoder needs a test-time NMS (``MODEL.DENSE_QUERY.DECODER_NMS_THRESH``). ``num_matched``
    still normalises it.

    ``quality_weight`` > 0 trains the stages' predicted-IoU branch (``"quality"`` logits (B, N, 1) in the
    prediction): on the matched queries and every query overlapping an object by IoU >= ``OVERLAP_IOU``,
    ``loss_quality = w_quality * sum(BCE(quality, IoU(box, gt))) / R * (matched / num_matched)`` (box
    detached), the scale of the box losses.
    """

    def __init__(self, matcher: HungarianMatcher, class_weight: float, l1_weight: float, giou_weight: float,
                 alpha: float, gamma: float, cls_target: str = "one_hot", box_queries: str = "matched",
                 cls_queries: str = "matched", quality_weight: float = 0.0):
        if cls_target not in CLS_TARGETS:
            raise ValueError(f"MODEL.QUERY.CLS_TARGET must be one of {CLS_TARGETS}, got {cls_target!r}")
        for key, value in (("BOX_LOSS_QUERIES", box_queries), ("CLS_LOSS_QUERIES", cls_queries)):
            if value not in LOSS_QUERIES:
                raise ValueError(f"MODEL.QUERY.{key} must be one of {LOSS_QUERIES}, got {value!r}")
        if quality_weight < 0:
            raise ValueError(f"MODEL.QUERY.QUALITY_WEIGHT must be >= 0, got {quality_weight}")
        self.box_queries, self.cls_queries = box_queries, cls_queries
        self.quality_weight = quality_weight
        self.matcher = matcher
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma
        self.cls_target = cls_target

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

    def single(self, logits, boxes, targets: List[dict], num_matched: float,
               quality: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses of one prediction: logits (B, N, K), boxes (B, N, 4), predicted-IoU logits (B, N, 1) or
        None (then no ``loss_quality``)."""
        if (quality is None) != (self.quality_weight == 0):
            raise ValueError(f"MODEL.QUERY.QUALITY_WEIGHT is {self.quality_weight} but the decoder's "
                             f"prediction {'has no' if quality is None else 'has a'} quality branch")
        matches = self.matcher.match_batch(logits.detach(), boxes.detach(), targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        gt_labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, matches)])
        gt_boxes = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, matches)]).to(boxes.dtype)
        image_whwh = torch.stack([t["whwh"] for t in targets]).to(boxes.dtype)  # (B, 4)

        # (image index, query index, label, ground-truth box) of the queries each loss trains
        trained = {"matched": (batch_idx, query_idx, gt_labels, gt_boxes)}
        if "overlapping" in (self.box_queries, self.cls_queries) or quality is not None:
            extra = self._overlapping(boxes.detach(), targets, matches)
            trained["overlapping"] = tuple(torch.cat(pair) for pair in zip(trained["matched"], extra))

        def box_iou(batch, query, gt):  # (R,) IoU of the trained queries' detached boxes with their gt
            return matched_pairwise_iou(Boxes(boxes[batch, query].detach()), Boxes(gt))

        def per_matched(query):  # sum over a trained set -> the scale of a sum over the matched queries
            return len(query_idx) / max(len(query), 1)

        cls_batch, cls_query, cls_labels, cls_gt = trained[self.cls_queries]
        target = torch.zeros_like(logits)
        if self.cls_target == "iou":
            target[cls_batch, cls_query, cls_labels] = box_iou(cls_batch, cls_query, cls_gt).to(target.dtype)
            loss_cls = quality_focal_loss(logits, target, self.gamma)
        else:
            target[cls_batch, cls_query, cls_labels] = 1.0
            loss_cls = sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        reg_batch, reg_query, _, reg_gt = trained[self.box_queries]
        reg, whwh = boxes[reg_batch, reg_query], image_whwh[reg_batch]
        box_scale = per_matched(reg_query)  # 1 when only the matched queries regress
        loss_l1 = (reg / whwh - reg_gt / whwh).abs().sum() * box_scale
        loss_giou = generalized_box_iou_loss(reg, reg_gt, reduction="sum") * box_scale
        losses = {
            "loss_cls": self.class_weight * loss_cls / num_matched,
            "loss_l1": self.l1_weight * loss_l1 / num_matched,
            "loss_giou": self.giou_weight * loss_giou / num_matched,
        }
        if quality is not None:
            q_batch, q_query, _, q_gt = trained["overlapping"]
            iou = box_iou(q_batch, q_query, q_gt).to(quality.dtype)
            loss_quality = F.binary_cross_entropy_with_logits(
                quality[q_batch, q_query, 0], iou, reduction="sum") * per_matched(q_query)
            losses["loss_quality"] = self.quality_weight * loss_quality / num_matched
        return losses

    @staticmethod
    def _overlapping(boxes: torch.Tensor, targets: List[dict], matches):
        """The unmatched queries whose box (B, N, 4) has IoU >= OVERLAP_IOU with a ground-truth box: their
        (image index (R,), query index (R,), label (R,) and box (R, 4, in ``boxes``' dtype) of the ground
        truth each overlaps most)."""
        batch, queries, labels, gt = [], [], [], []
        for i, (t, (matched_queries, _)) in enumerate(zip(targets, matches)):
            if not len(t["boxes"]):
                continue
            best, index = pairwise_iou(Boxes(boxes[i]), Boxes(t["boxes"].to(boxes.dtype))).max(dim=1)
            chosen = best >= OVERLAP_IOU
            chosen[matched_queries] = False
            query = chosen.nonzero().flatten()
            batch.append(torch.full_like(query, i))
            queries.append(query)
            labels.append(t["labels"][index[query]])
            gt.append(t["boxes"][index[query]].to(boxes.dtype))
        if not queries:
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            return empty, empty, empty, boxes.new_zeros(0, 4)
        return torch.cat(batch), torch.cat(queries), torch.cat(labels), torch.cat(gt)

    def __call__(
        self, predictions: List[Dict[str, torch.Tensor]], targets: List[dict]
    ) -> Dict[str, torch.Tensor]:
        """predictions: supervised outputs in order; targets: per image ``{"labels" (M,) int64,
        "boxes" (M, 4) xyxy pixels, "whwh" (4,) image size}``."""
        logits = predictions[0]["logits"]
        num_matched = self.num_matched(targets, logits.shape[1], logits.device, self.matcher.matches_per_gt)
        losses = {}
        for i, pred in enumerate(predictions):
            single = self.single(pred["logits"], pred["boxes"], targets, num_matched, pred.get("quality"))
            for name, value in single.items():
                losses[f"s{i}_{name}"] = value
        return losses
