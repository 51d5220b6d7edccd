"""``QueryDetector``: backbone -> channel mapper -> initial queries -> query decoder.

AdaMixer and DEQDet differ only in the decoder (``MODEL.QUERY.DECODER``) and the channel mapper
(``MODEL.QUERY.NECK_STYLE``).
"""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from .outputs import DecoderInputs, decoder_outputs, query_targets
from .query import ChannelMapper, InitialQueries, QueryDecoder, SetCriterion, build_query_decoder

__all__ = ["QueryDetector"]


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
        if q.QUALITY_WEIGHT > 0:
            raise ValueError("MODEL.QUERY.QUALITY_WEIGHT > 0 (a predicted-IoU branch) is the combined "
                             'detector\'s: use MODEL.META_ARCHITECTURE "DenseQueryDetector"')
        backbone = build_backbone(cfg)
        neck = ChannelMapper(
            backbone.output_shape(), q.IN_FEATURES, q.FEAT_CHANNELS, q.NECK_STYLE, q.NECK_NORM_GROUPS
        )
        return {
            "backbone": backbone,
            "neck": neck,
            "queries": InitialQueries(q.NUM_QUERIES, q.CONTENT_DIM),
            "decoder": build_query_decoder(cfg, neck.strides),
            "criterion": SetCriterion.from_config(cfg),
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
