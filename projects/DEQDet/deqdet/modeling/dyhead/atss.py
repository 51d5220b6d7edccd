"""ATSS (Zhang et al., CVPR 2020) as a Detectron2 meta-architecture.

Adaptive training sample selection: per box, the ``TOPK`` anchors per level whose centres are
nearest the box centre are candidates; those with IoU >= mean + std of the candidates' IoUs and with
their centre inside the box are positives (an anchor positive for several boxes takes the one of
highest IoU). Losses as the official DyHead port: sigmoid focal loss / #positives, GIoU of the
decoded boxes weighted by the centerness targets / their sum (x ``REG_LOSS_WEIGHT``), centerness
BCE / #positives; the normalisers are averaged over processes. Inference: class probability above
``INFERENCE_TH``, score = probability x centerness, ``PRE_NMS_TOP_N`` per level, class-wise NMS.
"""

import math
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_anchor_generator, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

__all__ = ["ATSS", "ATSSHead", "atss_assign", "centerness_targets"]

# The official ATSS's fixed constants: the classifier's prior probability (its initial bias) and the
# box coder's (dx, dy, dw, dh) weights.
PRIOR_PROB = 0.01
BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Norms with batch statistics, which the towers keep one per pyramid level.
PER_LEVEL_NORMS = ("BN", "SyncBN")


@torch.no_grad()
def atss_assign(anchors: List[Tensor], gt_boxes: Tensor, topk: int) -> Tensor:
    """Adaptive training sample selection for one image.

    Args:
        anchors: per level, (R_l, 4) anchors in XYXY.
        gt_boxes: (M, 4) boxes in XYXY.
        topk: candidates per level (already multiplied by the anchors per location).
    Returns:
        (sum R_l,) index of the box each anchor is assigned to, -1 for background.
    """
    all_anchors = torch.cat(anchors)
    num_gt = len(gt_boxes)
    if num_gt == 0:
        return torch.full((len(all_anchors),), -1, dtype=torch.long, device=all_anchors.device)
    ious = pairwise_iou(Boxes(all_anchors), Boxes(gt_boxes))  # (R, M)
    anchor_centers = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    distances = torch.cdist(anchor_centers, (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2)  # (R, M)

    candidates, start = [], 0
    for level in anchors:
        k = min(topk, len(level))
        candidates.append(distances[start : start + len(level)].topk(k, dim=0, largest=False).indices + start)
        start += len(level)
    candidates = torch.cat(candidates)  # (K, M)
    gt_index = torch.arange(num_gt, device=gt_boxes.device)
    candidate_ious = ious[candidates, gt_index]
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    centers = anchor_centers[candidates]  # (K, M, 2)
    inside = torch.cat([centers - gt_boxes[:, :2], gt_boxes[:, 2:] - centers], dim=2).min(dim=2).values > 0.01
    positive = (candidate_ious >= threshold) & inside

    quality = torch.full_like(ious, -1.0)
    rows, cols = candidates[positive], gt_index.expand_as(candidates)[positive]
    quality[rows, cols] = ious[rows, cols]
    best, index = quality.max(dim=1)
    index[best < 0] = -1
    return index


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """(P, 4) anchors and their (P, 4) boxes -> (P,) sqrt of the min/max ratios of the anchor
    centre's distances to the left/right and top/bottom sides (the centre lies inside the box)."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    near = centers - boxes[:, :2]  # left, top
    far = boxes[:, 2:] - centers  # right, bottom
    ratio = torch.minimum(near, far) / torch.maximum(near, far)
    return torch.sqrt(ratio[:, 0] * ratio[:, 1])


def _mean_over_processes(value: Tensor) -> float:
    """Average a scalar tensor over the processes of a distributed run."""
    if comm.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / comm.get_world_size()
    return value.item()


class Scale(nn.Module):
    """A learned scalar multiplier (``scale``), one per level on the box regression."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ATSSHead(nn.Module):
    """Towers (``cls_tower``, ``bbox_tower``: NUM_CONVS x [conv3x3, norm, ReLU]; absent when 0) and
    1x1 predictors ``cls_logits`` (A x K), ``bbox_pred`` (A x 4, times a per-level ``scales``) and
    ``centerness`` (A). Names as microsoft/DynamicHead's ATSS head.

    With a batch norm (``norm`` in ``PER_LEVEL_NORMS``) the tower convs stay shared but every pyramid level
    has its own norms (``cls_norms[l][j]``, ``bbox_norms[l][j]``; the towers' norm slots are then
    identities), as Detectron2's ``RetinaNetHead`` does: one BatchNorm shared by all levels keeps running
    statistics that are a mix dominated by the last (coarsest) level, which then normalises every level
    at test time. GroupNorm is shared by the levels, as the official head.
    """

    @configurable
    def __init__(
        self, *, input_shape: List[ShapeSpec], num_classes: int, num_anchors: int, num_convs: int, norm: str,
        prior_prob: float = PRIOR_PROB,
    ):
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"ATSSHead: all MODEL.ATSS.IN_FEATURES must have the same channels, got {channels}"
            )
        (channels,) = channels
        norm_per_level = norm in PER_LEVEL_NORMS
        if num_convs > 0:
            tower_norm = "" if norm_per_level else norm
            self.cls_tower = self._tower(channels, num_convs, tower_norm)
            self.bbox_tower = self._tower(channels, num_convs, tower_norm)
        else:
            self.cls_tower = self.bbox_tower = None
        self.cls_norms = self.bbox_norms = None
        if num_convs > 0 and norm_per_level:
            self.cls_norms, self.bbox_norms = (
                nn.ModuleList(
                    [nn.ModuleList([get_norm(norm, channels) for _ in range(num_convs)]) for _ in input_shape]
                )
                for _ in range(2)
            )
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, num_anchors, kernel_size=1)
        for layer in [self.cls_logits, self.bbox_pred, self.centerness]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.ModuleList([Scale() for _ in input_shape])

    @staticmethod
    def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers += [conv, get_norm(norm, channels) or nn.Identity(), nn.ReLU()]
        return nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        a = cfg.MODEL.ATSS
        return {
            "input_shape": input_shape,
            "num_classes": a.NUM_CLASSES,
            "num_anchors": build_anchor_generator(cfg, input_shape).num_cell_anchors[0],
            "num_convs": a.NUM_CONVS,
            "norm": a.NORM,
        }

    @staticmethod
    def _run_tower(tower, norms, x: Tensor) -> Tensor:
        """A tower on one level's (N, C, H, W) map; ``norms`` that level's norms (None: the tower's own)."""
        if tower is None:
            return x
        if norms is None:
            return tower(x)
        for j, norm in enumerate(norms):
            x = tower[3 * j + 2](norm(tower[3 * j](x)))  # conv, (identity), ReLU
        return x

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level (N, C, H, W) -> per level logits (N, A K, H, W), deltas (N, A 4, H, W),
        centerness logits (N, A, H, W)."""
        logits, deltas, centerness = [], [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            cls_feature = self._run_tower(self.cls_tower, self.cls_norms and self.cls_norms[level], feature)
            box_feature = self._run_tower(
                self.bbox_tower, self.bbox_norms and self.bbox_norms[level], feature
            )
            logits.append(self.cls_logits(cls_feature))
            deltas.append(scale(self.bbox_pred(box_feature)))
            centerness.append(self.centerness(box_feature))
        return logits, deltas, centerness


@META_ARCH_REGISTRY.register()
class ATSS(DenseDetector):
    """ATSS detector: backbone features ``MODEL.ATSS.IN_FEATURES`` -> :class:`ATSSHead`."""

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head: ATSSHead,
        head_in_features: List[str],
        anchor_generator,
        box2box_transform: Box2BoxTransform,
        num_classes: int,
        topk: int,
        focal_loss_alpha: float,
        focal_loss_gamma: float,
        reg_loss_weight: float,
        test_score_thresh: float,
        test_topk_candidates: int,
        test_nms_thresh: float,
        max_detections_per_image: int,
        pixel_mean,
        pixel_std,
    ):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.num_classes = num_classes
        self.topk = topk
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.reg_loss_weight = reg_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg):
        a = cfg.MODEL.ATSS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in a.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.ATSS.IN_FEATURES: {missing} not produced by the backbone ({sorted(shapes)})"
            )
        feature_shapes = [shapes[f] for f in a.IN_FEATURES]
        anchor_generator = build_anchor_generator(cfg, feature_shapes)
        return {
            "backbone": backbone,
            "head": ATSSHead(cfg, feature_shapes),
            "head_in_features": a.IN_FEATURES,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=BBOX_REG_WEIGHTS),
            "num_classes": a.NUM_CLASSES,
            "topk": a.TOPK * anchor_generator.num_cell_anchors[0],
            "focal_loss_alpha": a.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": a.FOCAL_LOSS_GAMMA,
            "reg_loss_weight": a.REG_LOSS_WEIGHT,
            "test_score_thresh": a.INFERENCE_TH,
            "test_topk_candidates": a.PRE_NMS_TOP_N,
            "test_nms_thresh": a.NMS_TH,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]) -> Tuple[Tensor, Tensor]:
        """Returns (N, R) class labels (``num_classes`` = background) and (N, R, 4) matched boxes."""
        labels, boxes = [], []
        for inst in gt_instances:
            index = atss_assign([a.tensor for a in anchors], inst.gt_boxes.tensor, self.topk)
            matched = index.clamp(min=0)
            label = inst.gt_classes[matched] if len(inst) else torch.zeros_like(index)
            labels.append(torch.where(index >= 0, label, torch.full_like(index, self.num_classes)))
            gt = inst.gt_boxes.tensor
            boxes.append(gt[matched] if len(inst) else gt.new_zeros(len(index), 4))
        return torch.stack(labels), torch.stack(boxes)

    def forward_training(self, images: ImageList, features, predictions, gt_instances):
        logits, deltas, centerness = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(
            Boxes.cat(anchors).tensor, torch.cat(logits, 1), torch.cat(deltas, 1),
            torch.cat(centerness, 1)[..., 0], gt_labels, gt_boxes,
        )

    def losses(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, centerness: Tensor, gt_labels: Tensor,
        gt_boxes: Tensor,
    ):
        """anchors (R, 4); logits (N, R, K); deltas (N, R, 4); centerness (N, R); gt_labels (N, R);
        gt_boxes (N, R, 4)."""
        positive = gt_labels != self.num_classes
        num_pos = max(_mean_over_processes(positive.sum().float()), 1.0)
        get_event_storage().put_scalar("num_pos_anchors", positive.sum().item() / len(gt_labels))
        targets = F.one_hot(gt_labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss_cls = sigmoid_focal_loss_jit(
            logits, targets, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="sum"
        ) / num_pos

        pos_anchors = anchors.expand_as(gt_boxes)[positive]
        pos_boxes = gt_boxes[positive]
        ctr_targets = centerness_targets(pos_anchors, pos_boxes)
        ctr_sum = max(_mean_over_processes(ctr_targets.sum()), 1e-6)
        pred_boxes = self.box2box_transform.apply_deltas(deltas[positive], pos_anchors)
        # torchvision's GIoU loss is fvcore's without its box-order assertion: diverged (NaN) boxes
        # give a NaN loss that the trainer reports by name, not an AssertionError.
        loss_box = (generalized_box_iou_loss(pred_boxes, pos_boxes) * ctr_targets).sum() / ctr_sum
        loss_ctr = (
            F.binary_cross_entropy_with_logits(centerness[positive], ctr_targets, reduction="sum") / num_pos
        )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box * self.reg_loss_weight, "loss_ctr": loss_ctr}

    def forward_inference(self, images: ImageList, features, predictions):
        logits, deltas, centerness = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            # The threshold applies to the class probability; the ranking score includes centerness.
            scores = [
                torch.where(p > self.test_score_thresh, p * c.sigmoid(), torch.zeros_like(p))
                for p, c in ((x[i].sigmoid(), y[i]) for x, y in zip(logits, centerness))
            ]
            pred = self._decode_multi_level_predictions(
                anchors, scores, [x[i] for x in deltas], 0.0, self.test_topk_candidates, image_size
            )
            boxes = pred.pred_boxes.tensor  # float32 (Detectron2's Boxes), whatever the scores' dtype
            keep = batched_nms(boxes, pred.scores.to(boxes.dtype), pred.pred_classes, self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results
