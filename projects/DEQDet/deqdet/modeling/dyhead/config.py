"""``add_dyhead_config``: the config keys of Dynamic Head, ATSS and the DyHead box head."""

from detectron2.config import CfgNode as CN

__all__ = ["add_dyhead_config"]


def add_dyhead_config(cfg: CN) -> CN:
    """Add ``MODEL.DYHEAD`` and ``MODEL.ATSS`` (defaults as microsoft/DynamicHead) to ``cfg``."""
    cfg.MODEL.DYHEAD = CN()
    # Number of stacked DyHead blocks after the FPN (paper: 6 best on R50; 0 = plain FPN).
    cfg.MODEL.DYHEAD.NUM_CONVS = 6
    # Offsets/masks given to the DCN on the coarser level: "aligned" (the level-l predictions at the
    # coarse positions) or "official" (microsoft/DynamicHead's kernel memory reinterpretation; use it
    # to run their released weights as trained).
    cfg.MODEL.DYHEAD.COARSE_OFFSETS = "aligned"
    # Task-aware attention layers in "DyHeadBoxHead" (each a DyReLU on the pooled RoI features).
    cfg.MODEL.DYHEAD.ROI_NUM_ATTENTION = 2
    # Initialise the conv that predicts the DCN offsets and masks to zero (mmdetection's DyHead default:
    # every block starts as a regular 3x3 conv) instead of PyTorch's default (microsoft/DynamicHead). For
    # training from scratch: random initial offsets scramble the small maps of a CPU-sized model.
    cfg.MODEL.DYHEAD.ZERO_INIT_OFFSET = False
    # Make every block residual, F + gamma * block(F), with a per-channel gamma initialised to zero: the
    # blocks start as the identity (for training from scratch). False: the official block (no residual).
    cfg.MODEL.DYHEAD.IDENTITY_INIT = False
    # Pad inputs to a multiple of this many pixels; 0: of the coarsest output stride (128 for P3-P7, as
    # microsoft/DynamicHead). The blocks only need each level to be the stride-2 successor of the one
    # below, which the bottom-up network's coarsest stride (32) already gives; on small inputs padding to
    # 128 costs up to a third more pixels.
    cfg.MODEL.DYHEAD.SIZE_DIVISIBILITY = 0

    cfg.MODEL.ATSS = CN()
    # Candidates per level (times anchors per location) closest to a box centre.
    cfg.MODEL.ATSS.TOPK = 9
    cfg.MODEL.ATSS.NUM_CLASSES = 80
    # Backbone features the head reads (finest first).
    cfg.MODEL.ATSS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # 3x3 conv layers in each of the classification and box towers (0 when DyHead replaces them).
    cfg.MODEL.ATSS.NUM_CONVS = 4
    # Norm of the tower convs: "GN" (GroupNorm(32), one shared by the levels, the official head), "BN" /
    # "SyncBN" (one per level, as Detectron2's RetinaNetHead: batch statistics differ by level) or "".
    cfg.MODEL.ATSS.NORM = "GN"
    cfg.MODEL.ATSS.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.ATSS.FOCAL_LOSS_ALPHA = 0.25
    # Weight of the GIoU box loss.
    cfg.MODEL.ATSS.REG_LOSS_WEIGHT = 2.0
    # Inference: score threshold on the class probability, candidates per level, NMS IoU.
    cfg.MODEL.ATSS.INFERENCE_TH = 0.05
    cfg.MODEL.ATSS.PRE_NMS_TOP_N = 1000
    cfg.MODEL.ATSS.NMS_TH = 0.6
    return cfg
