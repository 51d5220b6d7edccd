"""``QueryDetector``: backbone -> channel mapper -> initial queries -> query decoder.

AdaMixer and DEQDet differ only in the decoder (``MODEL.QUERY.DECODER``) and the channel mapper
(``MODEL.QUERY.NECK_STYLE``).
"""

from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .query import (
    ChannelMapper,
    HungarianMatcher,
    InitialQueries,
    QueryDecoder,
    SetCriterion,
    build_query_decoder,
)

__all__ = [
    "DecoderInputs",
    "QueryDetector",
    "decoder_outputs",
    "postprocess_outputs",
    "query_targets",
    "set_criterion_from_config",
    "topk_detections",
]


class DecoderInputs(NamedTuple):
    """Everything a query decoder receives, as a detector's ``initial_queries`` computes it."""

    images: ImageList  #: the preprocessed, padded batch
    content: torch.Tensor  #: (B, N, D) initial query content
    xyzr: torch.Tensor  #: (B, N, 4) initial query boxes
    features: List[torch.Tensor]  #: L x (B, C, H_l, W_l), the maps the decoder reads
    prior: Optional[torch.Tensor]  #: (B, N, K) logits added to the decoder's class logits, or None


def set_criterion_from_config(cfg) -> SetCriterion:
    """The Hungarian matcher and set criterion with the ``MODEL.QUERY`` loss (= matching cost) weights."""
    q = cfg.MODEL.QUERY
    weights = dict(class_weight=q.CLASS_WEIGHT, l1_weight=q.L1_WEIGHT, giou_weight=q.GIOU_WEIGHT,
                   alpha=q.FOCAL_ALPHA, gamma=q.FOCAL_GAMMA)
    matcher = HungarianMatcher(**weights, matches_per_gt=q.MATCHES_PER_GT)
    return SetCriterion(matcher, **weights, cls_target=q.CLS_TARGET, box_queries=q.BOX_LOSS_QUERIES,
                         cls_queries=q.CLS_LOSS_QUERIES, quality_weight=q.QUALITY_WEIGHT)


def query_targets(instances: Instances, image_size) -> Dict[str, torch.Tensor]:
    """Ground truth of one image as the set criterion takes it: ``labels`` (M,), ``boxes`` (M, 4) xyxy
    pixels, ``whwh`` (4,) the (unpadded) image size."""
    h, w = image_size
    boxes = instances.gt_boxes.tensor
    return {"labels": instances.gt_classes, "boxes": boxes, "whwh": boxes.new_tensor([w, h, w, h])}


def postprocess_outputs(
    results: List[Instances], extras: Dict[str, torch.Tensor], batched_inputs: List[dict], image_sizes
) -> List[dict]:
    """Per image ``{"instances": detector_postprocess(...), **{k: extras[k][i]}}`` (extras: (B, ...)
    per-image values such as the DEQ ``residuals`` and ``steps``)."""
    return [
        {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1])),
         **{k: v[i] for k, v in extras.items()}}
        for i, (r, x, size) in enumerate(zip(results, batched_inputs, image_sizes))
    ]


def topk_detections(
    logits: torch.Tensor, boxes: torch.Tensor, image_sizes, k: int, nms_thresh: float = 1.0
) -> List[Instances]:
    """logits (B, N, K), boxes (B, N, 4) -> per image the top ``k`` (query, class) pairs by sigmoid
    score, boxes clipped to the image; with ``nms_thresh`` < 1, of those the ones a class-wise NMS at
    that IoU keeps (best first), else no NMS."""
    results = []
    num_classes = logits.shape[-1]
    for scores, boxes_i, size in zip(logits.sigmoid(), boxes, image_sizes):
        top_scores, top_idx = scores.flatten().topk(min(k, scores.numel()))
        out = Instances(size)
        out.pred_boxes = Boxes(boxes_i[top_idx // num_classes])
        out.pred_boxes.clip(size)
        out.scores = top_scores
        out.pred_classes = top_idx % num_classes
        if nms_thresh < 1.0:
            out = out[batched_nms(out.pred_boxes.tensor, out.scores, out.pred_classes, nms_thresh)]
        results.append(out)
    return results


def quality_logits(prediction: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (B, N, K) of a prediction's detection scores: its class ``logits``, or with predicted-IoU
    ``quality`` (B, N, 1) the logits of ``sqrt(sigmoid(logits) * sigmoid(quality))`` (IoU-aware RetinaNet's
    score with exponent 0.5)."""
    if "quality" not in prediction:
        return prediction["logits"]
    log_score = 0.5 * (F.logsigmoid(prediction["logits"]) + F.logsigmoid(prediction["quality"]))
    return log_score - torch.log(-torch.expm1(log_score))  # logit(s) = log s - log(1 - s)


def decoder_outputs(
    prediction: Dict[str, torch.Tensor],
    batched_inputs: List[dict],
    image_sizes,
    detections_per_image: int,
    nms_thresh: float = 1.0,
) -> List[dict]:
    """A decoder's inference prediction (``QueryDecoder.predict``, prior added) -> Detectron2's
    outputs: per image the top ``detections_per_image`` (query, class) pairs (class-wise NMS at
    ``nms_thresh`` if < 1, see :func:`topk_detections`) as ``instances`` in original-image pixels, and
    the prediction's other entries (e.g. DEQ ``residuals``, ``steps``). With predicted-IoU ``quality``
    logits (B, N, 1) a detection scores ``sqrt(sigmoid(logit) * sigmoid(quality))``."""
    results = topk_detections(
        quality_logits(prediction), prediction["boxes"], image_sizes, detections_per_image, nms_thresh
    )
    extras = {k: v for k, v in prediction.items() if k not in ("logits", "boxes", "quality")}
    return postprocess_outputs(results, extras, batched_inputs, image_sizes)


@META_ARCH_REGISTRY.register()
class QueryDetector(nn.Module):
    """Sparse query-based detector. Training returns the decoder's losses (``QueryDecoder.losses``
    with the set criterion); inference scores the decoder's prediction (``QueryDecoder.predict``):
    sigmoid scores, top-k over all (query, class) pairs, boxes clipped to the image, no NMS. Other
    entries of that prediction (DEQDecoder: ``residuals``, ``steps``) are returned per image next to
    ``instances``."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: ChannelMapper,
        queries: InitialQueries,
        decoder: QueryDecoder,
        criterion: SetCriterion,
        pixel_mean,
        pixel_std,
        detections_per_image: int = 100,
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.queries = queries
        self.decoder = decoder
        self.criterion = criterion
        self.detections_per_image = detections_per_image
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        q = cfg.MODEL.QUERY
        backbone = build_backbone(cfg)
        neck = ChannelMapper(
            backbone.output_shape(), q.IN_FEATURES, q.FEAT_CHANNELS, q.NECK_STYLE, q.NECK_NORM_GROUPS
        )
        return {
            "backbone": backbone,
            "neck": neck,
            "queries": InitialQueries(q.NUM_QUERIES, q.CONTENT_DIM),
            "decoder": build_query_decoder(cfg, neck.strides),
            "criterion": set_criterion_from_config(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "size_divisibility": max(32, backbone.size_divisibility),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def initial_queries(self, batched_inputs: List[dict]) -> DecoderInputs:
        """Everything the decoder receives (:class:`DecoderInputs`; no ``prior`` here, see
        ``DenseQueryDetector``). Used by :meth:`forward` and by the refinement visualisation."""
        images = self.preprocess_image(batched_inputs)
        features = self.neck(self.backbone(images.tensor))
        content, xyzr = self.queries(images.image_sizes)
        return DecoderInputs(images, content, xyzr, features, None)

    def forward(self, batched_inputs: List[dict]):
        """Detectron2's model interface: a list of mapped dicts with ``image`` (C, H, W) and, in
        training, ``instances`` holding ``gt_boxes`` and ``gt_classes``."""
        inputs = self.initial_queries(batched_inputs)
        image_sizes = inputs.images.image_sizes
        if self.training:
            targets = [query_targets(x["instances"].to(self.device), size)
                       for x, size in zip(batched_inputs, image_sizes)]
            return self.decoder.losses(inputs.content, inputs.xyzr, inputs.features,
                                       lambda preds: self.criterion(preds, targets))
        prediction = self.decoder.predict(inputs.content, inputs.xyzr, inputs.features)
        return decoder_outputs(prediction, batched_inputs, image_sizes, self.detections_per_image)
