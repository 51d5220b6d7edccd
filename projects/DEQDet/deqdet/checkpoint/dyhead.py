"""microsoft/DynamicHead (Detectron2 format) -> this project: the names already agree.

Their models are Detectron2's ResNet / FPN / RetinaNet / GeneralizedRCNN with their own ``DyHead``
backbone wrapper (``backbone.backbone`` = the FPN, ``backbone.dyhead_tower.<i>`` = the blocks) and
``ATSS`` head (``head.cls_logits`` / ``bbox_pred`` / ``centerness`` / ``scales``); ours use the same
names and shapes (see :mod:`deqdet.modeling.dyhead`), so the conversion is the identity. What it
adds is a check: every key must belong to one of those modules (else ``KeyError`` naming it) and
every DyHead block present must be complete. Nothing is dropped.
"""

import re
from typing import Dict, Set

from torch import Tensor

from . import Conversion, register_converter

__all__ = ["convert_dyhead"]

# Module prefixes of the official ATSS / RetinaNet / Faster R-CNN + DyHead models (R50 or R101).
_KNOWN = re.compile(
    r"^(backbone\.backbone\.(bottom_up\.|fpn_lateral\d|fpn_output\d|top_block\.p[67]\.)"
    r"|backbone\.dyhead_tower\.\d+\."
    r"|head\.(cls_logits|bbox_pred|centerness|scales\.\d+|cls_tower\.\d+|bbox_tower\.\d+|"
    r"cls_subnet\.\d+|bbox_subnet\.\d+|cls_score)\."
    r"|proposal_generator\.rpn_head\.|roi_heads\.(box_head|box_predictor)\.)"
)
_BLOCK = re.compile(r"^backbone\.dyhead_tower\.(\d+)\.")
# Tensors of one official DyConv block (dyhead/dyhead.py + dyhead/dyrelu.py).
_BLOCK_KEYS = {
    f"DyConv.{j}.{m}.{p}" for j in range(3) for m in ("conv", "bn") for p in ("weight", "bias")
} | {
    "AttnConv.1.weight", "AttnConv.1.bias", "relu.fc.0.weight", "relu.fc.0.bias", "relu.fc.2.weight",
    "relu.fc.2.bias", "offset.weight", "offset.bias",
}


@register_converter("dyhead")
def convert_dyhead(state_dict: Dict[str, Tensor]) -> Conversion:
    """Identity with a check of the official key set; see the module docstring."""
    blocks: Dict[str, Set[str]] = {}
    for key in state_dict:
        if not _KNOWN.match(key):
            raise KeyError(f"dyhead checkpoint: unknown key {key!r}")
        block = _BLOCK.match(key)
        if block:
            blocks.setdefault(block.group(0), set()).add(key[block.end():])
    for prefix, names in sorted(blocks.items()):
        missing = sorted(_BLOCK_KEYS - names)
        if missing:
            raise KeyError(f"dyhead checkpoint: block {prefix.rstrip('.')} lacks {missing[0]!r}")
        extra = sorted(names - _BLOCK_KEYS)
        if extra:
            raise KeyError(f"dyhead checkpoint: unknown key {prefix + extra[0]!r}")
    return Conversion(dict(state_dict))
