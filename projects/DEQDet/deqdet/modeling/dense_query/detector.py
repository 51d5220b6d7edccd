"""``DenseQueryDetector``: a dense one-to-many head and a sparse query decoder on one pyramid.

::

    image -> backbone (+ FPN, + MODEL.DYHEAD.NUM_CONVS DyHead blocks) -> pyramid
    pyramid[head features] -> dense detector (MODEL.DENSE_QUERY.DENSE_DETECTOR: ATSS or RetinaNet)
                              -> DenseOutputs (anchors, per-level predictions; computed once)
                              -> its one-to-many losses
                              -> distinct top-N boxes (class-agnostic NMS), their class scores and
                                 features (detached) -> initial boxes, class prior and content
    pyramid[MODEL.QUERY.IN_FEATURES] -> query decoder (QUERY_DECODER_REGISTRY: DEQDecoder or
                              AdaMixerDecoder), IoU-aware set losses -> Instances

The dense detector (``dense``) is any of Detectron2's ``DenseDetector`` meta-architectures whose head
predicts (class logits, box deltas from anchors[, centerness logits]); it is built from the same config
with its own ``MODEL.<NAME>`` keys, owns the backbone, and keeps its head, assignment, losses and
inference unchanged. The decoder receives content and xyzr as in
:class:`~deqdet.modeling.meta_arch.QueryDetector` and does not know where its boxes came from.

The queries start where the dense head points (as DDQ and two-stage DETRs): the first rows' boxes are the
dense head's distinct top-scoring boxes, their content a linear layer + LayerNorm of the detached
dense-head feature at their anchor (image-specific content that says what the box holds), and the
decoder's class logits start from the detached log-odds of the dense head's score (the class prior), so
refinement learns a residual on the dense ranking. Queries left over keep a learned embedding, a
whole-image box and the prior ``PRIOR_EPS``. ``INFERENCE_SOURCE`` picks which head's detections are
returned (``both``: the decoder's as ``instances`` and the dense head's as ``dense_instances``, from one
forward), ``DECODER_NMS_THRESH`` < 1 removes the decoder's same-class duplicates at inference.
"""

from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import nms

from ..dyhead.atss import ATSS
from ..outputs import DecoderInputs, decoder_outputs, postprocess_outputs, query_targets
from ..query import InitialQueries, QueryDecoder, build_query_decoder
from ..query.boxes import xyxy_to_xyzr
from .criterion import IoUAwareCriterion, quality_logits

__all__ = ["DenseOutputs", "DenseQueryDetector", "first_kept", "DENSE_DETECTORS", "INFERENCE_SOURCES"]

DENSE_DETECTORS = {"ATSS": "MODEL.ATSS.NUM_CLASSES", "RetinaNet": "MODEL.RETINANET.NUM_CLASSES"}
INFERENCE_SOURCES = ("decoder", "dense", "both")
# Class-prior probability of the queries that no dense box initialised (and the logit clamp).
PRIOR_EPS = 1e-4
# The dense proposals: candidates per level (by max class score) entering a class-agnostic NMS at this IoU.
PROPOSAL_TOPK_PER_LEVEL = 1000
PROPOSAL_NMS_THRESH = 0.7


class DenseOutputs(NamedTuple):
    """The dense head's predictions per level, anchor-major, and the anchors they refer to."""

    anchors: List[Boxes]  #: L x (R_l, 4)
    logits: List[torch.Tensor]  #: L x (B, R_l, K)
    deltas: List[torch.Tensor]  #: L x (B, R_l, 4)
    centerness: Optional[List[torch.Tensor]]  #: L x (B, R_l, 1) (ATSS), or None (RetinaNet)

    @classmethod
    def of(cls, dense: DenseDetector, features: List[torch.Tensor], predictions) -> "DenseOutputs":
        """From the head's predictions (per output, L x (B, A * dims, H_l, W_l)) on ``features``."""
        dims = [dense.num_classes, 4, 1][: len(predictions)]
        per_output = [[permute_to_N_HWA_K(x, d) for x in p] for p, d in zip(predictions, dims)]
        centerness = per_output[2] if len(per_output) > 2 else None
        return cls(dense.anchor_generator(features), per_output[0], per_output[1], centerness)

    def losses(self, dense: DenseDetector, gt_instances: List[Instances]) -> Dict[str, torch.Tensor]:
        """The dense detector's own losses (its ``label_anchors`` and ``losses``) of these outputs."""
        gt_labels, gt_boxes = dense.label_anchors(self.anchors, gt_instances)
        if isinstance(dense, ATSS):
            return dense.losses(
                Boxes.cat(self.anchors).tensor, torch.cat(self.logits, 1), torch.cat(self.deltas, 1),
                torch.cat(self.centerness, 1)[..., 0], gt_labels, gt_boxes,
            )
        return dense.losses(self.anchors, self.logits, gt_labels, self.deltas, gt_boxes)


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


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it multiplied by ``scale``."""
    if scale == 1.0:
        return x
    return x.detach() if scale == 0.0 else x * scale + x.detach() * (1.0 - scale)


@META_ARCH_REGISTRY.register()
class DenseQueryDetector(nn.Module):
    """A dense detector + query decoder on a shared pyramid (module docstring).

    Training returns the dense detector's losses (``dense_loss_*``) and the decoder's set losses (named
    as in ``QueryDetector``). Inference returns per image ``instances`` from ``inference_source`` and,
    for a DEQ decoder, its ``residuals`` and ``steps``.
    """

    @configurable
    def __init__(
        self,
        *,
        dense: DenseDetector,
        queries: InitialQueries,
        content_proj: nn.Module,
        decoder: QueryDecoder,
        criterion: IoUAwareCriterion,
        query_in_features: List[str],
        decoder_feature_grad: float = 1.0,
        inference_source: str = "decoder",
        decoder_nms_thresh: float = 1.0,
    ):
        super().__init__()
        if inference_source not in INFERENCE_SOURCES:
            raise ValueError(
                f"MODEL.DENSE_QUERY.INFERENCE_SOURCE must be one of {INFERENCE_SOURCES}, "
                f"got {inference_source!r}"
            )
        if decoder_feature_grad < 0:
            raise ValueError(
                f"MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD must be >= 0, got {decoder_feature_grad}"
            )
        if not 0.0 < decoder_nms_thresh <= 1.0:
            raise ValueError(
                f"MODEL.DENSE_QUERY.DECODER_NMS_THRESH must be in (0, 1], got {decoder_nms_thresh}"
            )
        self.dense = dense
        self.queries = queries
        self.decoder = decoder
        self.criterion = criterion
        self.query_in_features = list(query_in_features)
        self.decoder_feature_grad = decoder_feature_grad
        self.inference_source = inference_source
        self.decoder_nms_thresh = decoder_nms_thresh
        self.content_proj = content_proj

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
        if q.NUM_CLASSES != dense.num_classes:
            raise ValueError(f"MODEL.QUERY.NUM_CLASSES ({q.NUM_CLASSES}) and "
                             f"{DENSE_DETECTORS[dq.DENSE_DETECTOR]} ({dense.num_classes}) must be equal")
        shapes = dense.backbone.output_shape()
        missing = [f for f in q.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.QUERY.IN_FEATURES: {missing} not produced by the backbone "
                             f"({sorted(shapes)})")
        channels = {shapes[f].channels for f in q.IN_FEATURES}
        if channels != {q.FEAT_CHANNELS}:
            raise ValueError(
                f"MODEL.QUERY.FEAT_CHANNELS ({q.FEAT_CHANNELS}) must equal the channels of "
                f"MODEL.QUERY.IN_FEATURES ({sorted(channels)}): the decoder reads the pyramid directly"
            )
        head_channels = shapes[dense.head_in_features[0]].channels
        return dict(
            dense=dense,
            content_proj=nn.Sequential(nn.Linear(head_channels, q.CONTENT_DIM), nn.LayerNorm(q.CONTENT_DIM)),
            queries=InitialQueries(q.NUM_QUERIES, q.CONTENT_DIM),
            decoder=build_query_decoder(cfg, [shapes[f].stride for f in q.IN_FEATURES]),
            criterion=IoUAwareCriterion.from_config(cfg, quality_weight=q.QUALITY_WEIGHT),
            query_in_features=q.IN_FEATURES,
            decoder_feature_grad=dq.DECODER_FEATURE_GRAD,
            inference_source=dq.INFERENCE_SOURCE,
            decoder_nms_thresh=dq.DECODER_NMS_THRESH,
        )

    @torch.no_grad()
    def dense_proposals(
        self, images: ImageList, features: List[torch.Tensor], outputs: DenseOutputs
    ) -> List[Instances]:
        """The dense head's distinct boxes per image, best first: per level the
        ``PROPOSAL_TOPK_PER_LEVEL`` anchors of highest score ``max_k p_k`` (``x centerness`` where the
        head predicts it, as ATSS ranks), decoded, clipped to the image, class-agnostic NMS at
        ``PROPOSAL_NMS_THRESH``, at most ``NUM_QUERIES`` kept.

        Args:
            features: the dense head's input maps, L x (B, C, H_l, W_l).
        Returns:
            per image Instances with ``pred_boxes`` (n, 4), ``scores`` (n,), ``class_scores`` (n, K): the
            ranking score per class of the anchor each box came from, and ``features`` (n, C): the dense
            head's input feature at that anchor's location.
        """
        dense = self.dense
        centerness = outputs.centerness or [None] * len(outputs.logits)
        anchors_per_cell = dense.anchor_generator.num_cell_anchors[0]
        # all levels' maps side by side, (B, C, sum_l H_l W_l); a candidate's cell indexes its column
        flat_features = torch.cat([f.flatten(2) for f in features], dim=2)
        level_starts = [0]
        for f in features[:-1]:
            level_starts.append(level_starts[-1] + f.shape[-2] * f.shape[-1])
        num_queries = self.queries.content.num_embeddings
        results = []
        for i, image_size in enumerate(images.image_sizes):
            boxes, class_scores, cells = [], [], []
            for level_anchors, x, d, c, start in zip(
                outputs.anchors, outputs.logits, outputs.deltas, centerness, level_starts
            ):
                probs = x[i].sigmoid() if c is None else x[i].sigmoid() * c[i].sigmoid()  # (R_l, K)
                index = probs.amax(dim=1).topk(min(PROPOSAL_TOPK_PER_LEVEL, len(probs))).indices
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
            keep = first_kept(proposal_boxes, scores, PROPOSAL_NMS_THRESH, num_queries)
            proposals = proposals[keep]
            proposals.features = flat_features[i][:, torch.cat(cells)[keep]].t()  # (n, C)
            results.append(proposals)
        return results

    def initial_queries(self, batched_inputs: List[dict]) -> DecoderInputs:
        """Everything the decoder receives (:class:`~deqdet.modeling.outputs.DecoderInputs`: images,
        content, xyzr, the decoder's features and the class prior added to its logits), as the forward
        computes them (for tools that drive the decoder, e.g. the refinement visualisation)."""
        return self._forward_parts(batched_inputs)[0]

    def _forward_parts(self, batched_inputs: List[dict]):
        """(DecoderInputs, the dense head's input maps L x (B, C, H_l, W_l), its raw predictions, its
        DenseOutputs): the backbone, the dense head and the initial queries, each computed once."""
        images, features, dense_features, predictions = self._dense_parts(batched_inputs)
        dense_outputs = DenseOutputs.of(self.dense, dense_features, predictions)
        grad = self.decoder_feature_grad
        query_features = [_scale_gradient(features[f], grad) for f in self.query_in_features]
        content, xyzr, prior = self._queries(images, dense_features, dense_outputs)
        inputs = DecoderInputs(images, content, xyzr, query_features, prior)
        return inputs, dense_features, predictions, dense_outputs

    def _dense_parts(self, batched_inputs: List[dict]):
        """Images, the pyramid {name: (B, C, H_l, W_l)}, the dense head's input maps and its predictions."""
        images = self.dense.preprocess_image(batched_inputs)
        features = self.dense.backbone(images.tensor)
        dense_features = [features[f] for f in self.dense.head_in_features]
        return images, features, dense_features, self.dense.head(dense_features)

    def _queries(self, images: ImageList, dense_features: List[torch.Tensor], outputs: DenseOutputs):
        """Initial content (B, N, D), xyzr (B, N, 4) and the class prior (B, N, K) logits.

        The first rows' boxes are the dense proposals (made at least 1 px wide and high), their prior
        ``logit(class_scores)`` and their content the projection of the detached dense-head feature at
        their anchor; the other rows keep the learned content, the whole-image box and ``PRIOR_EPS``.
        """
        content, xyzr = self.queries(images.image_sizes)
        xyzr = xyzr.clone()
        prior = xyzr.new_full((*xyzr.shape[:2], self.num_classes), PRIOR_EPS)
        contents = []
        for i, proposals in enumerate(self.dense_proposals(images, dense_features, outputs)):
            boxes = proposals.pred_boxes.tensor
            boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)], dim=1)
            xyzr[i, : len(boxes)] = xyxy_to_xyzr(boxes).to(xyzr.dtype)
            prior[i, : len(boxes)] = proposals.class_scores.to(prior.dtype)
            projected = self.content_proj(proposals.features.to(content.dtype))
            contents.append(torch.cat([projected, content[i, len(boxes):]]))
        return torch.stack(contents), xyzr, torch.logit(prior, eps=PRIOR_EPS)

    def forward(self, batched_inputs: List[dict]):
        """Detectron2's model interface (see ``QueryDetector.forward``)."""
        if not self.training and self.inference_source == "dense":  # no queries to make
            images, _, dense_features, predictions = self._dense_parts(batched_inputs)
            return self._dense_outputs(batched_inputs, images, dense_features, predictions)
        inputs, dense_features, predictions, dense_outputs = self._forward_parts(batched_inputs)
        images = inputs.images
        if self.training:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            losses = {f"dense_{k}": v for k, v in dense_outputs.losses(self.dense, gt_instances).items()}
            targets = [query_targets(x, size) for x, size in zip(gt_instances, images.image_sizes)]

            def loss_fn(preds):
                return self.criterion([{**p, "logits": p["logits"] + inputs.prior} for p in preds], targets)

            losses.update(self.decoder.losses(inputs.content, inputs.xyzr, inputs.features, loss_fn))
            return losses
        prediction = self.decoder.predict(inputs.content, inputs.xyzr, inputs.features)
        prediction = {**prediction, "logits": prediction["logits"] + inputs.prior}
        scored = {k: v for k, v in prediction.items() if k != "quality"}
        scored["logits"] = quality_logits(prediction)
        outputs = decoder_outputs(
            scored, batched_inputs, images.image_sizes, self.dense.max_detections_per_image,
            self.decoder_nms_thresh,
        )
        if self.inference_source == "both":
            dense = self._dense_outputs(batched_inputs, images, dense_features, predictions)
            for out, dense_out in zip(outputs, dense):
                out["dense_instances"] = dense_out["instances"]
        return outputs

    def _dense_outputs(self, batched_inputs, images: ImageList, dense_features, predictions) -> List[dict]:
        """The dense detector's own inference, post-processed: per image ``{"instances": ...}``."""
        results = self.dense.forward_inference(images, dense_features, predictions)
        return postprocess_outputs(results, {}, batched_inputs, images.image_sizes)
