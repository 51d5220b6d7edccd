"""What the query-based detectors share around their decoder: the decoder's inputs, the targets of
the set criterion, and the post-processing of predictions into Detectron2's outputs."""

from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.layers import batched_nms
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

__all__ = ["DecoderInputs", "decoder_outputs", "postprocess_outputs", "query_targets", "topk_detections"]


class DecoderInputs(NamedTuple):
    """Everything a query decoder receives, as a detector's ``initial_queries`` computes it."""

    images: ImageList  #: the preprocessed, padded batch
    content: torch.Tensor  #: (B, N, D) initial query content
    xyzr: torch.Tensor  #: (B, N, 4) initial query boxes
    features: List[torch.Tensor]  #: L x (B, C, H_l, W_l), the maps the decoder reads
    prior: Optional[torch.Tensor]  #: (B, N, K) logits added to the decoder's class logits, or None


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
    the prediction's other entries (e.g. DEQ ``residuals``, ``steps``)."""
    results = topk_detections(
        prediction["logits"], prediction["boxes"], image_sizes, detections_per_image, nms_thresh
    )
    extras = {k: v for k, v in prediction.items() if k not in ("logits", "boxes")}
    return postprocess_outputs(results, extras, batched_inputs, image_sizes)
