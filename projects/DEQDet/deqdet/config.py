"""``add_deqdet_config``: every config key this project adds to Detectron2's defaults."""

import torch
from detectron2.config import CfgNode as CN

from .modeling.dense_query.config import add_dense_query_config
from .modeling.deq.config import add_deqdet_decoder_config
from .modeling.dyhead.config import add_dyhead_config
from .modeling.query.config import add_query_config

__all__ = ["add_deqdet_config"]


def add_deqdet_config(cfg: CN) -> CN:
    """Add the project's keys (with defaults) to ``cfg`` in place and return it."""
    # CUDA when there is a device, else CPU; a config file or override may still name a device.
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    # Train (and evaluate inside the trainer) with the 4-D parameters in channels-last memory format:
    # convolutions that follow run channels-last too (the demo's training step: 13% faster on the CPU).
    cfg.MODEL.CHANNELS_LAST = False
    # torch.set_float32_matmul_precision, set when the trainer builds the model: "highest" (full fp32),
    # "high" (TF32 matmuls on GPUs that have them; the official DEQDet sets it) or "medium". No effect on CPU.
    cfg.MODEL.FLOAT32_MATMUL_PRECISION = "highest"

    # Inference (evaluation in the trainer, deqdet.predictor.Predictor, tools/predict.py) under
    # torch.autocast with this dtype: "" (off, float32), "bfloat16" or "float16" (deqdet.autocast).
    cfg.TEST.AUTOCAST = ""

    # Optimizer built by deqdet.optim.build_optimizer: "SGD" (Detectron2's) or "AdamW".
    cfg.SOLVER.OPTIMIZER = "SGD"
    # How the optimizer's update runs, the same update either way: "" (PyTorch's default: a loop over the
    # parameters on the CPU, multi-tensor "foreach" kernels on GPUs), "foreach", or "fused" (one fused
    # kernel; CPU and CUDA). "foreach" / "fused" also clip with foreach kernels under CLIP_TYPE full_model.
    # "fused" with SOLVER.AMP and gradient clipping is refused (the fused step takes scaled gradients).
    # On 2 CPU cores "fused" halves the demo's optimizer step.
    cfg.SOLVER.OPTIMIZER_IMPL = ""
    # Learning-rate / weight-decay multipliers by parameter name (deqdet.optim): a list of
    # (regex, lr_mult, decay_mult); a parameter takes the first rule whose regex re.search-es its name in
    # model.named_parameters() (e.g. "decoder.refine_stage.fc_cls.weight"), no rule: 1, 1. They multiply
    # the lr / decay of Detectron2's default groups (BIAS_LR_FACTOR, WEIGHT_DECAY_NORM, ...). Like
    # mmdetection's paramwise_cfg custom_keys. DEQDet: [["^decoder\\.", 4.0, 10.0]].
    cfg.SOLVER.PARAM_GROUP_RULES = []

    # COCO-format datasets to register before DATASETS.TRAIN / TEST are used, each
    # "NAME=JSON_FILE[:IMAGE_ROOT]" (IMAGE_ROOT defaults to the JSON file's folder); see docs/own_data.md.
    cfg.DATASETS.COCO_FILES = ()
    add_query_config(cfg)  # MODEL.QUERY, INPUT.DETR_CROP (query-based detector)
    add_dyhead_config(cfg)  # MODEL.DYHEAD, MODEL.ATSS
    add_deqdet_decoder_config(cfg)  # MODEL.DEQDET (the equilibrium decoder)
    add_dense_query_config(cfg)  # MODEL.DENSE_QUERY (the combined dense head + query decoder)
    return cfg
