"""Channel mappers from backbone levels (C2-C5) to the decoder's feature channels."""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["ChannelMapper", "NECK_STYLES"]

# style -> (kernel size, ReLU after the conv). AdaMixer: 1x1 conv + bias; DEQDet: mmdetection's
# ChannelMapper defaults, 3x3 conv + bias + ReLU. Both then apply one GroupNorm shared by all levels.
NECK_STYLES = {"AdaMixer": (1, False), "DEQDet": (3, True)}


class ChannelMapper(nn.Module):
    """Per level a conv to ``out_channels`` (optionally ReLU), then ONE shared ``GroupNorm``.

    The maps are returned channels-last (the same values): the decoder's 3D sampling then gathers
    each point's channel vectors in place (:func:`~deqdet.modeling.query.sampling.sample_3d`)."""

    def __init__(
        self, input_shapes: Dict[str, ShapeSpec], in_features: List[str], out_channels: int, style: str,
        num_groups: int = 32,
    ):
        super().__init__()
        if style not in NECK_STYLES:
            raise ValueError(f"MODEL.QUERY.NECK_STYLE must be one of {sorted(NECK_STYLES)}, got {style!r}")
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                f"MODEL.QUERY.IN_FEATURES {missing} are not backbone outputs {sorted(input_shapes)}"
            )
        kernel_size, self.relu = NECK_STYLES[style]
        self.in_features = list(in_features)
        self.strides = [input_shapes[f].stride for f in in_features]
        self.convs = nn.ModuleList(
            nn.Conv2d(input_shapes[f].channels, out_channels, kernel_size, padding=kernel_size // 2)
            for f in in_features
        )
        self.norm = nn.GroupNorm(num_groups, out_channels)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Backbone outputs by name -> list of (B, out_channels, H_l, W_l), channels-last, in
        ``in_features`` order."""
        outs = []
        for name, conv in zip(self.in_features, self.convs):
            out = conv(features[name])
            out = self.norm(F.relu(out) if self.relu else out)
            outs.append(out.contiguous(memory_format=torch.channels_last))
        return outs
