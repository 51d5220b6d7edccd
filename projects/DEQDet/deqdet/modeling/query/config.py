"""``add_query_config``: the config keys of the query-based detector (AdaMixer, DEQDet)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_query_config"]


def add_query_config(cfg: CN) -> None:
    """Add ``MODEL.QUERY`` and the DETR-style augmentation."""
    cfg.MODEL.QUERY = q = CN()
    # Decoder from QUERY_DECODER_REGISTRY ("AdaMixerDecoder"; DEQDet adds its own).
    q.DECODER = "AdaMixerDecoder"
    # Backbone outputs fed to the channel mapper (C2-C5, strides 4-32).
    q.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Channel mapper: "AdaMixer" (1x1 conv + bias) or "DEQDet" (3x3 conv + bias + ReLU), then one
    # GroupNorm shared by all levels.
    q.NECK_STYLE = "AdaMixer"
    # Groups of that shared GroupNorm.
    q.NECK_NORM_GROUPS = 32
    # Channels C of the mapped feature maps, the features the decoder stages sample and mix.
    q.FEAT_CHANNELS = 256
    # Number of foreground classes (sigmoid classifier, no background class).
    q.NUM_CLASSES = 80
    # Number of queries N.
    q.NUM_QUERIES = 100
    # Query content dimension D.
    q.CONTENT_DIM = 256
    # Decoder stages (AdaMixer: 6 unshared stages).
    q.NUM_STAGES = 6
    # Self-attention heads (each with a learned IoF temperature).
    q.NUM_HEADS = 8
    # Hidden width of the stage's FFN.
    q.FFN_DIM = 2048
    # Sampled points per group P_in (AdaMixer 32, DEQDet 64).
    q.IN_POINTS = 32
    # Mixed points per group P_out.
    q.OUT_POINTS = 128
    # Sampling / mixing groups G.
    q.NUM_GROUPS = 4
    # Temperature of the level weights softmax(-(z - log2 stride)^2 / tau).
    q.LEVEL_TAU = 2.0
    # Loss weights (and matching-cost weights) of the focal, L1 (normalised xyxy) and GIoU terms.
    q.CLASS_WEIGHT = 2.0
    q.L1_WEIGHT = 5.0
    q.GIOU_WEIGHT = 2.0
    # Sigmoid focal loss / cost parameters.
    q.FOCAL_ALPHA = 0.25
    q.FOCAL_GAMMA = 2.0
    # Queries matched to each ground truth in training: 1 is one-to-one matching (the papers); k > 1 is
    # one-to-many matching (H-DETR), which trains near-duplicates as positives, so use it with a test-time
    # NMS on the decoder's detections (MODEL.DENSE_QUERY.DECODER_NMS_THRESH).
    q.MATCHES_PER_GT = 1
    # The combined detector's predicted-IoU branch: weight of its loss; 0: no branch (the papers). With a
    # weight > 0 each decoder stage also predicts the IoU of its refined box with its object, and a
    # detection scores sqrt(class score * predicted IoU), as IoU-aware RetinaNet (DenseQueryDetector only).
    q.QUALITY_WEIGHT = 0.0

    # DETR-style augmentation (deqdet.data.mapper.detr_augmentations, the recipe of DETR and AdaMixer): with
    # probability 0.5, before the final INPUT.MIN_SIZE_TRAIN resize, resize the shortest edge to one of
    # (400, 500, 600) and crop a random region with height and width each in [384, 600].
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = False
