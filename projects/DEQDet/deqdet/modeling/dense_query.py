"""``DenseQueryDetector``: a dense one-to-many head and a sparse query decoder on one pyramid.

::

    image -> backbone (+ FPN, + MODEL.DYHEAD.NUM_CONVS DyHead blocks) -> pyramid
    pyramid[head features]           -> dense detector (MODEL.DENSE_QUERY.DENSE_DETECTOR: ATSS or
                                        RetinaNet): one-to-many losses (x DENSE_LOSS_WEIGHT);
                                        decoded boxes -> class-agnostic NMS -> top-N (detached)
    pyramid[MODEL.QUERY.IN_FEATURES] -> query decoder (QUERY_DECODER_REGISTRY: DEQDecoder or
                                        AdaMixerDecoder), Hungarian set losses -> Instances
    (or, with DECODER_INPUT "bottom_up": the ResNet's MODEL.QUERY.IN_FEATURES -> the decoder's own
     channel mapper (MODEL.QUERY.NECK_STYLE, as QueryDetector) -> query decoder)

The dense detector (``dense``) is any of Detectron2's ``DenseDetector`` meta-architectures whose head
predicts (class logits, box deltas from anchors[, centerness logits]); it is built from the same config
with its own ``MODEL.<NAME>`` keys, owns the backbone, and keeps its head, assignment, losses and
inference unchanged. It does not know a decoder exists; the decoder receives content and xyzr as in
:class:`~deqdet.modeling.meta_arch.QueryDetector` and does not know where its boxes came from. This
class owns the wiring: ``MODEL.DENSE_QUERY.QUERY_INIT`` picks the decoder's initial boxes (``whole_image``
as in the papers, or ``dense_topk``: the dense head's distinct top-scoring boxes, as DDQ / two-stage
DETRs do), ``INFERENCE_SOURCE`` picks which head's detections are returned (``both``: the decoder's as
``instances`` and the dense head's as ``dense_instances``, from one forward), ``DECODER_NMS_THRESH`` < 1
removes the decoder's same-class duplicates at inference. DEQ residuals and steps per image stay in the
outputs.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import nms

from .meta_arch import (
    DecoderInputs,
    decoder_outputs,
    postprocess_outputs,
    query_targets,
    set_criterion_from_config,
)
from .query import ChannelMapper, InitialQueries, QueryDecoder, SetCriterion, build_query_decoder
from .query.boxes import xyxy_to_xyzr

__all__ = [
    "DenseQueryDetector", "first_kept", "DENSE_DETECTORS", "QUERY_INITS", "QUERY_CONTENTS",
    "INFERENCE_SOURCES", "DECODER_INPUTS",
]

DENSE_DETECTORS = {"ATSS": "MODEL.ATSS.NUM_CLASSES", "RetinaNet": "MODEL.RETINANET.NUM_CLASSES"}
QUERY_INITS = ("whole_image", "dense_topk")
QUERY_CONTENTS = ("embedding", "dense_feature")
INFERENCE_SOURCES = ("decoder", "dense", "both")
DECODER_INPUTS = ("pyramid", "bottom_up")
# Class-prior probability of the queries that no dense box initialised (and the logit clamp).
PRIOR_EPS = 1e-4


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it multiplied by ``scale``."""
    if scale == 1.0:
        return x
    return x.detach() if scale == 0.0 else x * scale + x.detach() * (1.0 - scale)


def bottom_up_of(backbone: nn.Module) -> nn.Module:
    """The bottom-up network (ResNet) under a pyramid backbone: the ``bottom_up`` of the first module
    along the ``backbone`` chain that has one (FPN, or the FPN inside a DyHead)."""
    module = backbone
    while not hasattr(module, "bottom_up"):
        module = getattr(module, "backbone", None)
        if module is None:
            raise ValueError(
                f'MODEL.DENSE_QUERY.DECODER_INPUT "bottom_up": the backbone {type(backbone).__name__} '
                "wraps no FPN with a bottom_up network"
            )
    return module.bottom_up


def _decoder_input(cfg, backbone: nn.Module):
    """``MODEL.DENSE_QUERY.DECODER_INPUT`` -> (the decoder's own channel mapper or None, the strides of
    the maps the decoder reads), after checking that ``MODEL.QUERY.IN_FEATURES`` exist with the right
    channels."""
    q, dq = cfg.MODEL.QUERY, cfg.MODEL.DENSE_QUERY
    if dq.DECODER_INPUT not in DECODER_INPUTS:
        raise ValueError(f"MODEL.DENSE_QUERY.DECODER_INPUT must be one of {DECODER_INPUTS}, "
                         f"got {dq.DECODER_INPUT!r}")
    own_neck = dq.DECODER_INPUT == "bottom_up"
    shapes = (bottom_up_of(backbone) if own_neck else backbone).output_shape()
    missing = [f for f in q.IN_FEATURES if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.QUERY.IN_FEATURES: {missing} not produced by the "
            f"{'bottom-up network' if own_neck else 'backbone'} ({sorted(shapes)}"
            f"{'; add them to MODEL.RESNETS.OUT_FEATURES' if own_neck else ''})"
        )
    if own_neck:
        neck = ChannelMapper(shapes, q.IN_FEATURES, q.FEAT_CHANNELS, q.NECK_STYLE, q.NECK_NORM_GROUPS)
        return neck, neck.strides
    channels = {shapes[f].channels for f in q.IN_FEATURES}
    if channels != {q.FEAT_CHANNELS}:
        raise ValueError(
            f"MODEL.QUERY.FEAT_CHANNELS ({q.FEAT_CHANNELS}) must equal the channels of "
            f"MODEL.QUERY.IN_FEATURES ({sorted(channels)}): the decoder reads the pyramid directly"
        )
    return None, [shapes[f].stride for f in q.IN_FEATURES]


def first_kept(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, k: int) -> torch.Tensor:
    """``nms(boxes, scores, iou_thresh)[:k]`` without running NMS over every candidate.

    Greedy NMS decides each box from the higher-scoring ones only, so NMS over the ``m`` best candidates
    keeps exactly the full run's keeps among them; once it keeps ``k`` they are the full run's first
    ``k``. ``m`` starts at ``4 k`` and grows 4x until that holds or all candidates are read (the same
    indices as the full run up to the order of equal scores). Early in training thousands of
    overlapping candidates make the full run the most expensive operation of a CPU training step.

    Args:
        boxes: (R, 4) xyxy, scores: (R,).
    Returns:
        (<= k,) indices into ``boxes``, best first.
    """
    order = scores.argsort(descending=True)
    m = 4 * k
    while True:
        candidates = order[:m]
        keep = nms(boxes[candidates], scores[candidates], iou_thresh)
        if len(keep) >= k or m >= len(order):
            return candidates[keep[:k]]
        m *= 4


def _with_prior(
    prediction: Dict[str, torch.Tensor], prior: Optional[torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """A decoder prediction with the (B, N, K) prior logits added to its ``logits`` (unchanged if None)."""
    return prediction if prior is None else {**prediction, "logits": prediction["logits"] + prior}


@META_ARCH_REGISTRY.register()
class DenseQueryDetector(nn.Module):
    """A dense detector + query decoder on a shared pyramid (module docstring).

    Training returns the dense detector's losses (``dense_loss_*``, weighted) and the decoder's set
    losses (named as in ``QueryDetector``). Inference returns per image ``instances`` from
    ``inference_source`` and, for a DEQ decoder, its ``residuals`` and ``steps``.
    """

    @configurable
    def __init__(
        self,
        *,
        dense: DenseDetector,
        queries: InitialQueries,
        decoder: QueryDecoder,
        criterion: SetCriterion,
        query_in_features: List[str],
        query_init: str = "dense_topk",
        dense_loss_weight: float = 1.0,
        proposal_nms_thresh: float = 0.7,
        proposal_topk_per_level: int = 1000,
        class_prior: bool = False,
        decoder_feature_grad: float = 1.0,
        inference_source: str = "decoder",
        decoder_nms_thresh: float = 1.0,
        content_proj: Optional[nn.Module] = None,
        decoder_neck: Optional[ChannelMapper] = None,
    ):
        super().__init__()
        self.dense = dense
        if query_init not in QUERY_INITS:
            raise ValueError(f"MODEL.DENSE_QUERY.QUERY_INIT must be one of {QUERY_INITS}, got {query_init!r}")
        if inference_source not in INFERENCE_SOURCES:
            raise ValueError(
                f"MODEL.DENSE_QUERY.INFERENCE_SOURCE must be one of {INFERENCE_SOURCES}, "
                f"got {inference_source!r}"
            )
        self.queries = queries
        self.decoder = decoder
        self.criterion = criterion
        self.query_in_features = list(query_in_features)
        self.query_init = query_init
        self.dense_loss_weight = dense_loss_weight
        self.proposal_nms_thresh = proposal_nms_thresh
        self.proposal_topk_per_level = proposal_topk_per_level
        self.class_prior = class_prior
        if decoder_feature_grad < 0:
            raise ValueError(
                f"MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD must be >= 0, got {decoder_feature_grad}"
            )
        self.decoder_feature_grad = decoder_feature_grad
        self.inference_source = inference_source
        if not 0.0 < decoder_nms_thresh <= 1.0:
            raise ValueError(
                f"MODEL.DENSE_QUERY.DECODER_NMS_THRESH must be in (0, 1], got {decoder_nms_thresh}"
            )
        self.decoder_nms_thresh = decoder_nms_thresh
        if content_proj is not None and query_init != "dense_topk":
            raise ValueError('MODEL.DENSE_QUERY.QUERY_CONTENT "dense_feature" needs QUERY_INIT "dense_topk"')
        self.content_proj = content_proj
        self.decoder_neck = decoder_neck

    @property
    def backbone(self):
        return self.dense.backbone

    @property
    def device(self) -> torch.device:
        return self.dense.device

    @property
    def num_classes(self) -> int:
        return self.dense.num_classes

    @classmethod
    def from_config(cls, cfg):
        q, dq = cfg.MODEL.QUERY, cfg.MODEL.DENSE_QUERY
        if dq.DENSE_DETECTOR not in DENSE_DETECTORS:
            raise ValueError(f"MODEL.DENSE_QUERY.DENSE_DETECTOR must be one of {sorted(DENSE_DETECTORS)}, "
                             f"got {dq.DENSE_DETECTOR!r}")
        dense_cfg = cfg.clone()
        dense_cfg.defrost()
        dense_cfg.MODEL.META_ARCHITECTURE = dq.DENSE_DETECTOR
        dense = META_ARCH_REGISTRY.get(dq.DENSE_DETECTOR)(dense_cfg)
        shapes = dense.backbone.output_shape()
        decoder_neck, strides = _decoder_input(cfg, dense.backbone)
        if q.NUM_CLASSES != dense.num_classes:
            raise ValueError(f"MODEL.QUERY.NUM_CLASSES ({q.NUM_CLASSES}) and "
                             f"{DENSE_DETECTORS[dq.DENSE_DETECTOR]} ({dense.num_classes}) must be equal")
        if dq.QUERY_CONTENT not in QUERY_CONTENTS:
            raise ValueError(f"MODEL.DENSE_QUERY.QUERY_CONTENT must be one of {QUERY_CONTENTS}, "
                             f"got {dq.QUERY_CONTENT!r}")
        head_channels = shapes[dense.head_in_features[0]].channels
        return dict(
            dense=dense,
            content_proj=nn.Sequential(nn.Linear(head_channels, q.CONTENT_DIM), nn.LayerNorm(q.CONTENT_DIM))
            if dq.QUERY_CONTENT == "dense_feature" else None,
            queries=InitialQueries(q.NUM_QUERIES, q.CONTENT_DIM),
            decoder=build_query_decoder(cfg, strides),
            decoder_neck=decoder_neck,
            criterion=set_criterion_from_config(cfg),
            query_in_features=q.IN_FEATURES,
            query_init=dq.QUERY_INIT,
            dense_loss_weight=dq.DENSE_LOSS_WEIGHT,
            proposal_nms_thresh=dq.PROPOSAL_NMS_THRESH,
            proposal_topk_per_level=dq.PROPOSAL_TOPK_PER_LEVEL,
            class_prior=dq.CLASS_PRIOR,
            decoder_feature_grad=dq.DECODER_FEATURE_GRAD,
            inference_source=dq.INFERENCE_SOURCE,
            decoder_nms_thresh=dq.DECODER_NMS_THRESH,
        )

    @torch.no_grad()
    def dense_proposals(
        self, images: ImageList, features: List[torch.Tensor], predictions
    ) -> List[Instances]:
        """The dense head's distinct boxes per image, best first: per level the
        ``proposal_topk_per_level`` anchors of highest score ``max_k p_k`` (``x centerness`` where the
        head predicts it, as ATSS ranks), decoded, clipped to the image, class-agnostic NMS at
        ``proposal_nms_thresh``, at most ``NUM_QUERIES`` kept.

        Returns per image Instances with ``pred_boxes`` (n, 4), ``scores`` (n,), ``class_scores``
        (n, K): the ranking score per class of the anchor each box came from, and ``features`` (n, C):
        the dense head's input feature at that anchor's location.
        """
        dense = self.dense
        # (logits, deltas) or (logits, deltas, centerness), each per level (N, R_l, channels)
        logits, deltas, *centerness = dense._transpose_dense_predictions(
            predictions, [dense.num_classes, 4] + [1] * (len(predictions) - 2))
        centerness = centerness[0] if centerness else [None] * len(logits)
        anchors = dense.anchor_generator(features)
        anchors_per_cell = dense.anchor_generator.num_cell_anchors[0]
        # all levels' maps side by side, (N, C, sum_l H_l W_l); a candidate's cell indexes its column
        flat_features = torch.cat([f.flatten(2) for f in features], dim=2)
        level_starts = [0]
        for f in features[:-1]:
            level_starts.append(level_starts[-1] + f.shape[-2] * f.shape[-1])
        num_queries = self.queries.content.num_embeddings
        results = []
        for i, image_size in enumerate(images.image_sizes):
            boxes, class_scores, cells = [], [], []
            for level_anchors, x, d, c, start in zip(anchors, logits, deltas, centerness, level_starts):
                probs = x[i].sigmoid() if c is None else x[i].sigmoid() * c[i].sigmoid()  # (R_l, K)
                index = probs.amax(dim=1).topk(min(self.proposal_topk_per_level, len(probs))).indices
                boxes.append(dense.box2box_transform.apply_deltas(d[i][index], level_anchors.tensor[index]))
                class_scores.append(probs[index])
                cells.append(start + index // anchors_per_cell)
            proposals = Instances(
                image_size, pred_boxes=Boxes(torch.cat(boxes)), class_scores=torch.cat(class_scores)
            )
            proposals.pred_boxes.clip(image_size)
            proposals.scores = proposals.class_scores.amax(dim=1)
            # float32 (Detectron2's Boxes) whatever the scores' dtype
            proposal_boxes = proposals.pred_boxes.tensor
            scores = proposals.scores.to(proposal_boxes.dtype)
            keep = first_kept(proposal_boxes, scores, self.proposal_nms_thresh, num_queries)
            proposals = proposals[keep]
            proposals.features = flat_features[i][:, torch.cat(cells)[keep]].t()  # (n, C)
            results.append(proposals)
        return results

    def initial_queries(self, batched_inputs: List[dict]) -> DecoderInputs:
        """Everything the decoder receives (:class:`~deqdet.modeling.meta_arch.DecoderInputs`: images,
        content, xyzr, the decoder's features and the class prior added to its logits or None), as the
        forward computes them (for tools that drive the decoder, e.g. the refinement visualisation)."""
        images, features, predictions, query_features = self._dense_forward(batched_inputs)
        dense_features = [features[f] for f in self.dense.head_in_features]
        content, xyzr, prior = self._queries(images, dense_features, predictions)
        return DecoderInputs(images, content, xyzr, query_features, prior)

    def _dense_forward(self, batched_inputs: List[dict]):
        """Images, the pyramid {name: (B, C, H_l, W_l)}, the dense head's predictions, and the maps the
        decoder reads: L x (B, FEAT_CHANNELS, H_l, W_l), the pyramid's or its own neck's over the
        bottom-up network's outputs, with the gradient into the shared layers x ``decoder_feature_grad``."""
        images = self.dense.preprocess_image(batched_inputs)
        if self.decoder_neck is None:
            features = self.dense.backbone(images.tensor)
            query_inputs = features
        else:  # the ResNet's outputs, caught on their way into the FPN
            query_inputs = {}
            hook = bottom_up_of(self.dense.backbone).register_forward_hook(
                lambda module, args, outputs: query_inputs.update(outputs))
            try:
                features = self.dense.backbone(images.tensor)
            finally:
                hook.remove()
        predictions = self.dense.head([features[f] for f in self.dense.head_in_features])
        query_features = [
            _scale_gradient(query_inputs[f], self.decoder_feature_grad) for f in self.query_in_features
        ]
        if self.decoder_neck is not None:
            query_features = self.decoder_neck(dict(zip(self.query_in_features, query_features)))
        return images, features, predictions, query_features

    def _queries(self, images: ImageList, dense_features, predictions):
        """Initial content (B, N, D), xyzr (B, N, 4) and the class prior (B, N, K) logits or None.

        ``whole_image``: the learned content and whole-image boxes. ``dense_topk``: the first rows' boxes
        are the dense proposals (made at least 1 px wide and high); with ``class_prior`` their
        ``logit(class_scores)`` is the prior, ``logit(PRIOR_EPS)`` for the rows left whole-image; with
        ``content_proj`` (``QUERY_CONTENT`` "dense_feature") their content is that projection of the
        detached dense-head feature at their anchor (as DDQ), the learned content for the other rows.
        """
        content, xyzr = self.queries(images.image_sizes)
        if self.query_init == "whole_image":
            return content, xyzr, None
        xyzr = xyzr.clone()
        prior = xyzr.new_full((*xyzr.shape[:2], self.num_classes), PRIOR_EPS) if self.class_prior else None
        contents = []
        for i, proposals in enumerate(self.dense_proposals(images, dense_features, predictions)):
            boxes = proposals.pred_boxes.tensor
            boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)], dim=1)
            xyzr[i, : len(boxes)] = xyxy_to_xyzr(boxes).to(xyzr.dtype)
            if prior is not None:
                prior[i, : len(boxes)] = proposals.class_scores.to(prior.dtype)
            if self.content_proj is not None:
                projected = self.content_proj(proposals.features.to(content.dtype))
                contents.append(torch.cat([projected, content[i, len(boxes):]]))
        if contents:
            content = torch.stack(contents)
        return content, xyzr, None if prior is None else torch.logit(prior, eps=PRIOR_EPS)

    def forward(self, batched_inputs: List[dict]):
        """Detectron2's model interface (see ``QueryDetector.forward``)."""
        images, features, predictions, query_features = self._dense_forward(batched_inputs)
        dense_features = [features[f] for f in self.dense.head_in_features]
        if self.training:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            dense = self.dense.forward_training(images, dense_features, predictions, gt_instances)
            losses = {f"dense_{k}": v * self.dense_loss_weight for k, v in dense.items()}
            content, xyzr, prior = self._queries(images, dense_features, predictions)
            targets = [query_targets(x, size) for x, size in zip(gt_instances, images.image_sizes)]

            def loss_fn(preds):
                return self.criterion([_with_prior(p, prior) for p in preds], targets)

            losses.update(self.decoder.losses(content, xyzr, query_features, loss_fn))
            return losses
        if self.inference_source == "dense":
            results = self.dense.forward_inference(images, dense_features, predictions)
            return postprocess_outputs(results, {}, batched_inputs, images.image_sizes)
        content, xyzr, prior = self._queries(images, dense_features, predictions)
        prediction = _with_prior(self.decoder.predict(content, xyzr, query_features), prior)
        outputs = decoder_outputs(
            prediction, batched_inputs, images.image_sizes, self.dense.max_detections_per_image,
            self.decoder_nms_thresh,
        )
        if self.inference_source == "both":
            dense = self.dense.forward_inference(images, dense_features, predictions)
            dense = postprocess_outputs(dense, {}, batched_inputs, images.image_sizes)
            for out, dense_out in zip(outputs, dense):
                out["dense_instances"] = dense_out["instances"]
        return outputs
