"""The paper's two-stage form: task-aware attention on the pooled RoI features in the box head.

With ``ROI_BOX_HEAD.NAME: "DyHeadBoxHead"`` the backbone's blocks apply only the scale- and
spatial-aware attention to the FPN features; RoI pooling follows, then this head applies
``MODEL.DYHEAD.ROI_NUM_ATTENTION`` task-aware attentions (:class:`DyReLU`, coefficients from each
RoI's own pooled features) in place of the usual FC layers. ``ROI_BOX_HEAD.NUM_CONV`` / ``NUM_FC``
may still add Detectron2's conv / FC layers after them; with 0 and 0 (our configs) the predictor
reads the attended RoI features, flattened.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from torch import Tensor, nn

from .dyconv import DyReLU

__all__ = ["DyHeadBoxHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class DyHeadBoxHead(nn.Module):
    """(R, C, P, P) pooled features -> task-aware attentions -> Detectron2's conv/FC layers."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        num = cfg.MODEL.DYHEAD.ROI_NUM_ATTENTION
        if num < 1:
            raise ValueError(f"MODEL.DYHEAD.ROI_NUM_ATTENTION must be >= 1 for DyHeadBoxHead, got {num}")
        self.attention = nn.Sequential(*[DyReLU(input_shape.channels) for _ in range(num)])
        if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV + cfg.MODEL.ROI_BOX_HEAD.NUM_FC > 0:
            self.layers = FastRCNNConvFCHead(cfg, input_shape)
            self._output_shape = self.layers.output_shape
        else:
            self.layers = nn.Flatten()
            self._output_shape = ShapeSpec(
                channels=input_shape.channels * input_shape.height * input_shape.width
            )

    @property
    def output_shape(self) -> ShapeSpec:
        return self._output_shape

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, P, P) -> (R, D) (D = C P P when there is no conv/FC layer)."""
        return self.layers(self.attention(x))
