"""FPN + DyHead blocks as a Detectron2 ``Backbone``, so RetinaNet, ATSS and Faster R-CNN take it as is.

Module names follow microsoft/DynamicHead (``backbone`` = the FPN, ``dyhead_tower`` = the blocks),
and P6 is computed from P5 as there (not from C5 as Detectron2's RetinaNet FPN does).
"""

from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import Tensor, nn

from ..backbone import build_basic_resnet_backbone, build_resnet_backbone_project_norm, fpn_from_config
from .dyconv import DyConv

__all__ = [
    "DyHead",
    "build_retinanet_resnet_fpn_dyhead_backbone",
    "build_resnet_fpn_dyhead_backbone",
    "build_retinanet_basic_resnet_fpn_dyhead_backbone",
    "build_basic_resnet_fpn_dyhead_backbone",
]


class DyHead(Backbone):
    """A pyramid backbone followed by ``MODEL.DYHEAD.NUM_CONVS`` :class:`DyConv` blocks.

    Outputs the same names, strides and channels (``MODEL.FPN.OUT_CHANNELS``) as the wrapped backbone.
    The input is padded to a multiple of ``size_divisibility`` (0: the coarsest output stride, as the
    official code), at least the wrapped backbone's own, so every level is the stride-2 successor of
    the one below.
    """

    def __init__(self, backbone: Backbone, num_blocks: int, size_divisibility: int = 0, **block_kwargs):
        super().__init__()
        self.backbone = backbone
        in_channels = {s.channels for s in backbone.output_shape().values()}
        if len(in_channels) != 1:
            raise ValueError(f"DyHead: the pyramid's levels must share one channel count, got "
                             f"{sorted(in_channels)}")
        (channels,) = in_channels
        self.dyhead_tower = nn.Sequential(
            *[DyConv(channels, channels, **block_kwargs) for _ in range(num_blocks)]
        )
        shapes = backbone.output_shape()
        self._out_features = sorted(shapes, key=lambda k: shapes[k].stride)
        self._out_feature_strides = {k: shapes[k].stride for k in self._out_features}
        self._out_feature_channels = {k: channels for k in self._out_features}
        if size_divisibility < 0 or (size_divisibility and size_divisibility % backbone.size_divisibility):
            raise ValueError(
                f"MODEL.DYHEAD.SIZE_DIVISIBILITY ({size_divisibility}) must be 0 or a multiple of the "
                f"backbone's size divisibility ({backbone.size_divisibility})"
            )
        self._size_divisibility = size_divisibility or self._out_feature_strides[self._out_features[-1]]

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """(N, 3, H, W) -> {name: (N, C, H / stride, W / stride)}."""
        features = self.backbone(x)
        return self.dyhead_tower({k: features[k] for k in self._out_features})


def _wrap(cfg, bottom_up: Backbone, top_block) -> DyHead:
    fpn = fpn_from_config(cfg, bottom_up, top_block)
    d = cfg.MODEL.DYHEAD
    return DyHead(
        fpn,
        d.NUM_CONVS,
        size_divisibility=d.SIZE_DIVISIBILITY,
        coarse_offsets=d.COARSE_OFFSETS,
        # the paper's two-stage form: the box head applies the task-aware attention to pooled features
        task_attention=cfg.MODEL.ROI_BOX_HEAD.NAME != "DyHeadBoxHead",
        zero_init_offset=d.ZERO_INIT_OFFSET,
        identity_init=d.IDENTITY_INIT,
    )


def _p6p7(cfg) -> LastLevelP6P7:
    return LastLevelP6P7(cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.FPN.OUT_CHANNELS, in_feature="p5")


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_dyhead_backbone(cfg, input_shape: ShapeSpec) -> DyHead:
    """ResNet (Detectron2's) + FPN P3-P7 (P6 from P5) + DyHead: one-stage detectors."""
    return _wrap(cfg, build_resnet_backbone_project_norm(cfg, input_shape), _p6p7(cfg))


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_dyhead_backbone(cfg, input_shape: ShapeSpec) -> DyHead:
    """ResNet (Detectron2's) + FPN P2-P6 (P6 by max-pooling) + DyHead: Faster R-CNN."""
    return _wrap(cfg, build_resnet_backbone_project_norm(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_basic_resnet_fpn_dyhead_backbone(cfg, input_shape: ShapeSpec) -> DyHead:
    """Narrow ResNet-18/34 + FPN P3-P7 + DyHead, for the CPU-sized ``shapes`` recipes."""
    return _wrap(cfg, build_basic_resnet_backbone(cfg, input_shape), _p6p7(cfg))


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_dyhead_backbone(cfg, input_shape: ShapeSpec) -> DyHead:
    """Narrow ResNet-18/34 + FPN P2-P6 + DyHead, for the CPU-sized ``shapes`` recipes."""
    return _wrap(cfg, build_basic_resnet_backbone(cfg, input_shape), LastLevelMaxPool())
