"""Converter for the released AdaMixer checkpoints (MCG-NJU/AdaMixer, mmdetection names).

Official module -> ours:

- ``backbone.*`` (mmdetection / torchvision ResNet) -> Detectron2 ``ResNet`` (``STRIDE_IN_1X1: False``):
  ``conv1, bn1`` -> ``stem.conv1(.norm)``, ``layer{i}.{j}.conv{k}, bn{k}`` -> ``res{i+1}.{j}.conv{k}(.norm)``,
  ``downsample.0 / .1`` -> ``shortcut(.norm)``.
- ``neck.lateral_convs.{l}.conv`` -> ``neck.convs.{l}``, ``neck.gn_out`` -> ``neck.norm``.
- ``rpn_head.init_proposal_bboxes.weight`` -> ``queries.init_boxes`` (read by the forward, never trained),
  ``rpn_head.init_content_features`` -> ``queries.content``.
- ``roi_head.bbox_head.{s}.*`` -> ``decoder.stages.{s}.*``: ``attention.attn`` -> ``attention``,
  ``ffn.layers.0.0 / ffn.layers.1`` -> ``ffn.0 / ffn.2``,
  ``sampling_n_mixing.sampling_offset_generator.0`` -> ``sampling_offsets``,
  ``sampling_n_mixing.adaptive_mixing.*`` -> ``mixing.*``, ``sampling_n_mixing.norm`` -> ``mixing_norm``;
  the other names are the same.

Dropped on purpose: the ResNet's BatchNorm ``num_batches_tracked`` counters. The official backbone runs
with ``norm_eval`` (frozen statistics), so the counters never enter its forward; Detectron2's
``FrozenBatchNorm2d`` has no such buffer.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

from . import Conversion, convert_by_renaming, register_converter

__all__ = ["convert_adamixer", "rename_mmdet_resnet"]

_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"

# (official name inside a stage, our name inside a stage); patterns match whole names.
_STAGE_RENAMES = [
    (r"attention\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", r"attention.\1"),
    (rf"(attention_norm|ffn_norm|fc_cls|fc_reg)\.{_WB}", r"\1.\2"),
    (rf"(cls_fcs|reg_fcs)\.([01])\.{_WB}", r"\1.\2.\3"),
    (rf"ffn\.layers\.0\.0\.{_WB}", r"ffn.0.\1"),
    (rf"ffn\.layers\.1\.{_WB}", r"ffn.2.\1"),
    (rf"sampling_n_mixing\.sampling_offset_generator\.0\.{_WB}", r"sampling_offsets.\1"),
    (rf"sampling_n_mixing\.adaptive_mixing\.parameter_generator\.0\.{_WB}", r"mixing.parameter_generator.\1"),
    (rf"sampling_n_mixing\.adaptive_mixing\.out_proj\.{_WB}", r"mixing.out_proj.\1"),
    (rf"sampling_n_mixing\.norm\.{_WB}", r"mixing_norm.\1"),
    (r"iof_tau", "iof_tau"),
]

_RESNET_BLOCK_RENAMES = [
    (r"conv(\d)\.weight", r"conv\1.weight"),
    (rf"bn(\d)\.{_BN}", r"conv\1.norm.\2"),
    (r"downsample\.0\.weight", "shortcut.weight"),
    (rf"downsample\.1\.{_BN}", r"shortcut.norm.\1"),
]


def _first_match(renames, name: str) -> str | None:
    for pattern, target in renames:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(target)
    return None


def rename_mmdet_resnet(name: str) -> str | None:
    """An mmdetection ResNet key (without ``backbone.``) -> Detectron2 ResNet key, or None if unknown."""
    if name == "conv1.weight":
        return "stem.conv1.weight"
    m = re.fullmatch(rf"bn1\.{_BN}", name)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", name)
    block = m and _first_match(_RESNET_BLOCK_RENAMES, m.group(3))
    return block and f"res{int(m.group(1)) + 1}.{m.group(2)}.{block}"


def _rename(name: str) -> str | None:
    if name.startswith("backbone."):
        renamed = rename_mmdet_resnet(name[len("backbone."):])
        return renamed and f"backbone.{renamed}"
    m = re.fullmatch(rf"neck\.lateral_convs\.(\d+)\.conv\.{_WB}", name)
    if m:
        return f"neck.convs.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(rf"neck\.gn_out\.{_WB}", name)
    if m:
        return f"neck.norm.{m.group(1)}"
    if name == "rpn_head.init_proposal_bboxes.weight":
        return "queries.init_boxes"
    if name == "rpn_head.init_content_features.weight":
        return "queries.content.weight"
    m = re.fullmatch(r"roi_head\.bbox_head\.(\d+)\.(.+)", name)
    stage = m and _first_match(_STAGE_RENAMES, m.group(2))
    return stage and f"decoder.stages.{m.group(1)}.{stage}"


@register_converter("adamixer")
def convert_adamixer(state_dict: Dict[str, torch.Tensor]) -> Conversion:
    """mmdetection AdaMixer state dict -> ``QueryDetector`` state dict (see the module docstring).

    Raises:
        KeyError: a key this converter does not know (named in the message).
    """
    def unused(name: str) -> bool:
        return name.startswith("backbone.") and name.endswith(".num_batches_tracked")

    return convert_by_renaming(state_dict, _rename, unused, "AdaMixer")
