"""Converter for the released DEQDet checkpoints (MCG-NJU/DEQDet, mmdetection 3.x names).

Official module -> ours (``QueryDetector`` with ``DEQDecoder``):

- ``backbone.*`` (mmdetection / torchvision ResNet) -> Detectron2 ``ResNet``, as for AdaMixer.
- ``neck.convs.{l}.conv`` (ChannelMapper's 3x3 ConvModule) -> ``neck.convs.{l}``, ``neck.gn_out`` ->
  ``neck.norm``.
- ``rpn_head.init_proposal_bboxes.weight`` -> ``queries.init_boxes`` (frozen, read by the forward),
  ``rpn_head.init_proposal_features.weight`` -> ``queries.content.weight``.
- ``roi_head.bbox_head.0.*`` (init stage) -> ``decoder.init_stage.*``, ``roi_head.bbox_head.1.*``
  (the weight-tied refinement stage) -> ``decoder.refine_stage.*``, with the AdaMixer stage renames.

Dropped on purpose (never used by the official forward):

- ``roi_head.bbox_head.{0,1}.instance_interactive_conv.*`` and ``.instance_interactive_conv_norm.*``: the
  official ``AdaMixerHead`` subclasses Sparse R-CNN's ``DIIHead``, whose constructor builds a
  ``DynamicConv`` and a LayerNorm that ``AdaMixerHead.forward`` never calls.
- the ResNet's BatchNorm ``num_batches_tracked`` counters (the backbone runs with ``norm_eval``).
"""

from __future__ import annotations

import re
from typing import Dict

import torch

from . import Conversion, convert_by_renaming, register_converter
from .adamixer import _STAGE_RENAMES, _first_match, rename_mmdet_resnet

__all__ = ["convert_deqdet"]

_STAGES = {"0": "init_stage", "1": "refine_stage"}
_UNUSED = re.compile(r"roi_head\.bbox_head\.[01]\.instance_interactive_conv(_norm)?\..+")


def _rename(name: str) -> str | None:
    if name.startswith("backbone."):
        renamed = rename_mmdet_resnet(name[len("backbone."):])
        return renamed and f"backbone.{renamed}"
    m = re.fullmatch(r"neck\.convs\.(\d+)\.conv\.(weight|bias)", name)
    if m:
        return f"neck.convs.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"neck\.gn_out\.(weight|bias)", name)
    if m:
        return f"neck.norm.{m.group(1)}"
    if name == "rpn_head.init_proposal_bboxes.weight":
        return "queries.init_boxes"
    if name == "rpn_head.init_proposal_features.weight":
        return "queries.content.weight"
    m = re.fullmatch(r"roi_head\.bbox_head\.([01])\.(.+)", name)
    stage = m and _first_match(_STAGE_RENAMES, m.group(2))
    return stage and f"decoder.{_STAGES[m.group(1)]}.{stage}"


@register_converter("deqdet")
def convert_deqdet(state_dict: Dict[str, torch.Tensor]) -> Conversion:
    """mmdetection DEQDet state dict -> ``QueryDetector`` + ``DEQDecoder`` state dict (module docstring).

    Raises:
        KeyError: a key this converter does not know (named in the message).
    """
    return convert_by_renaming(state_dict, _rename, _unused, "DEQDet")


def _unused(name: str) -> bool:
    batch_count = name.startswith("backbone.") and name.endswith(".num_batches_tracked")
    return bool(_UNUSED.fullmatch(name)) or batch_count
