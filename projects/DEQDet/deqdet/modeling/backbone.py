"""ResNet builders: Detectron2's ResNet with the project's norms, and ResNet-18/34 of any width.

``build_resnet_backbone_project_norm`` is Detectron2's ``build_resnet_backbone`` with
``MODEL.RESNETS.NORM`` also accepting the project's norm names (:mod:`.norm`: ``"FrozenStatsBN"``, the
official AdaMixer / DEQDet backbone norm); the builders below accept them too.

Detectron2's ``build_resnet_backbone`` builds ResNet-18/34 (``BasicBlock``) only at the ImageNet
width (``RES2_OUT_CHANNELS == 64``). These builders take the width from
``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (doubling per stage)
and otherwise use Detectron2's own ``ResNet``, ``BasicStem``, ``BasicBlock`` and ``FPN``.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

from .norm import PROJECT_NORMS, resolve_norm

__all__ = [
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "build_resnet_backbone_project_norm",
    "build_retinanet_basic_resnet_fpn_backbone",
    "fpn_from_config",
]

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


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
    norm = resolve_norm(r.NORM)
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm)
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
