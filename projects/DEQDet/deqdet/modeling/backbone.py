"""ResNet builders: Detectron2's ResNet with the project's norms, and ResNet-18/34 of any width.

``build_resnet_backbone_project_norm`` is Detectron2's ``build_resnet_backbone`` with
``MODEL.RESNETS.NORM`` also accepting the project's norm names (:mod:`.norm`: ``"FrozenStatsBN"``, the
official AdaMixer / DEQDet backbone norm); the builders below accept them too.

Detectron2's ``build_resnet_backbone`` builds ResNet-18/34 (``BasicBlock``) only at the ImageNet
width (``RES2_OUT_CHANNELS == 64``). These builders take the width from
``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (doubling per stage)
and otherwise use Detectron2's own ``ResNet``, ``BasicStem``, ``BasicBlock`` and ``FPN``.

``MODEL.RESNETS.STEM_TYPE`` (added by :func:`add_basic_resnet_config`) picks the stem: ``"basic"``
(Detectron2's 7x7 stride-2 conv + 3x3 stride-2 max-pool) or ``"patch"`` (one 4x4 stride-4 conv, as
ConvNeXt's stem; same stride 4 and width, about 10% less training time of the whole backbone + FPN on
a CPU, where the 7x7 conv on 3 channels and the max-pool are slow).
"""

import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

from .norm import PROJECT_NORMS, resolve_norm

__all__ = [
    "PatchStem",
    "add_basic_resnet_config",
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "build_resnet_backbone_project_norm",
    "build_retinanet_basic_resnet_fpn_backbone",
    "fpn_from_config",
]

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def add_basic_resnet_config(cfg):
    """``MODEL.RESNETS.STEM_TYPE``: "basic" | "patch" (read only by the builders of this module)."""
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"


class PatchStem(CNNBlockBase):
    """(N, C_in, H, W) -> (N, C_out, H/4, W/4): a 4x4 stride-4 conv, norm, ReLU."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN"):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = Conv2d(
            in_channels, out_channels, 4, stride=4, bias=False, norm=get_norm(norm, out_channels)
        )

    def forward(self, x):
        return F.relu_(self.conv1(x))


_STEMS = {"basic": BasicStem, "patch": PatchStem}


@BACKBONE_REGISTRY.register()
def build_resnet_backbone_project_norm(cfg, input_shape: ShapeSpec) -> ResNet:
    """Detectron2's ``build_resnet_backbone``; ``MODEL.RESNETS.NORM`` may name a project norm: the
    ResNet is built with ``BN`` and nothing frozen, its BatchNorm layers are converted, then the stages
    up to ``MODEL.BACKBONE.FREEZE_AT`` are frozen (parameters only: the norm keeps its statistics)."""
    norm = cfg.MODEL.RESNETS.NORM
    if norm not in PROJECT_NORMS:
        return build_resnet_backbone(cfg, input_shape)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.NORM = "BN"
    freeze_at, cfg.MODEL.BACKBONE.FREEZE_AT = cfg.MODEL.BACKBONE.FREEZE_AT, 0
    return PROJECT_NORMS[norm].convert(build_resnet_backbone(cfg, input_shape)).freeze(freeze_at)


@BACKBONE_REGISTRY.register()
def build_basic_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 with ``BasicBlock`` stages of widths ``RES2_OUT_CHANNELS * (1, 2, 4, 8)``."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"build_basic_resnet_backbone: MODEL.RESNETS.DEPTH must be 18 or 34, got {r.DEPTH}")
    if r.STEM_TYPE not in _STEMS:
        raise ValueError(f"MODEL.RESNETS.STEM_TYPE must be one of {sorted(_STEMS)}, got {r.STEM_TYPE!r}")
    norm = resolve_norm(r.NORM)
    stem = _STEMS[r.STEM_TYPE](input_shape.channels, r.STEM_OUT_CHANNELS, norm)
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def fpn_from_config(cfg, bottom_up: Backbone, top_block) -> FPN:
    """Detectron2's ``FPN`` over ``bottom_up`` with the ``MODEL.FPN`` keys and the given top block."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Narrow ResNet + FPN with P6 by max-pooling (two-stage detectors: P2-P6)."""
    return fpn_from_config(cfg, build_basic_resnet_backbone(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Narrow ResNet + FPN with P6/P7 from C5 (one-stage detectors: P3-P7)."""
    bottom_up = build_basic_resnet_backbone(cfg, input_shape)
    in_channels = bottom_up.output_shape()["res5"].channels
    return fpn_from_config(cfg, bottom_up, LastLevelP6P7(in_channels, cfg.MODEL.FPN.OUT_CHANNELS))
