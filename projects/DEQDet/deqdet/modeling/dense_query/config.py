"""``add_dense_query_config``: the keys of the combined detector (``MODEL.DENSE_QUERY``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_dense_query_config"]


def add_dense_query_config(cfg: CN) -> None:
    """Add ``MODEL.DENSE_QUERY``: the wiring of ``DenseQueryDetector`` (its dense head is configured by
    ``MODEL.ATSS`` or ``MODEL.RETINANET``, its decoder by ``MODEL.QUERY`` / ``MODEL.DEQDET``)."""
    cfg.MODEL.DENSE_QUERY = d = CN()
    # The dense detector, a META_ARCH_REGISTRY name configured by its own keys: "ATSS" (MODEL.ATSS) or
    # "RetinaNet" (Detectron2's, MODEL.RETINANET). It owns the backbone (MODEL.BACKBONE) it shares.
    d.DENSE_DETECTOR = "ATSS"
    # Class-wise NMS at this IoU on the decoder's detections at inference (1.0: none, as the papers'
    # query decoders): one-to-one training suppresses a query that duplicates a better one only slowly.
    d.DECODER_NMS_THRESH = 1.0
    # Multiplier of the gradient the decoder's losses send into the shared pyramid (1: all of it, 0: the
    # decoder reads detached features and only the dense head trains the backbone, FPN and DyHead blocks).
    d.DECODER_FEATURE_GRAD = 1.0
    # Detections returned at inference: "decoder" (the query decoder's), "dense" (the dense head's) or "both"
    # (the decoder's as "instances", the dense head's as "dense_instances", from one forward; evaluations then
    # report the dense head's AP as the task "dense_bbox" next to the decoder's "bbox").
    d.INFERENCE_SOURCE = "decoder"
