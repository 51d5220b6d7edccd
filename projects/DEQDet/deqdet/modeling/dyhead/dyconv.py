"""One Dynamic Head block: scale-, spatial- and task-aware attention over a feature pyramid.

Attribute names follow microsoft/DynamicHead (``DyConv``, ``AttnConv``, ``offset``, ``relu.fc``,
``conv``/``bn``) so that its released checkpoints load with the names unchanged.
"""

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deform import (
    COARSE_OFFSET_MODES,
    DCN_IMPLS,
    coarse_level_offsets,
    modulated_deform_conv3x3,
    resolve_dcn_impl,
)

__all__ = ["HSigmoid", "DyReLU", "ModulatedDeformConv3x3", "DeformConvGN", "DyConv"]


class HSigmoid(nn.Module):
    """Hard sigmoid ``relu6(x + 3) / 6``: 0 below -3, 1 above 3, linear in between."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class DyReLU(nn.Module):
    """Task-aware attention: dynamic ReLU ``max(a1 x + b1, a2 x + b2)`` per channel.

    The coefficients come from the global average of the input: FC (C -> C/4), ReLU,
    FC (C/4 -> 4C), hard sigmoid, split into (a1, b1, a2, b2) and shifted so that
    ``a1 = 2 (s - 0.5) + 1``, ``a2 = 2 (s - 0.5)``, ``b = s - 0.5`` (a1 near 1, a2 and b near 0 when
    the FC output is near 0: the block starts as an identity-like ReLU).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, 4 * channels),
            HSigmoid(),
        )

    def coefficients(self, x: Tensor) -> Tensor:
        """(N, C, ...) -> (N, 4, C): rows a1, b1, a2, b2."""
        s = self.fc(x.flatten(2).mean(dim=2)).view(x.shape[0], 4, self.channels) - 0.5
        scale = s.new_tensor([2.0, 1.0, 2.0, 1.0]).view(1, 4, 1)
        shift = s.new_tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1)
        return s * scale + shift

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, ...) -> same shape."""
        coef = self.coefficients(x).view(x.shape[0], 4, self.channels, *([1] * (x.dim() - 2)))
        a1, b1, a2, b2 = coef.unbind(dim=1)
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class ModulatedDeformConv3x3(nn.Module):
    """DCNv2 layer, 3x3 kernel, padding 1, with bias: ``weight`` (C_out, C_in, 3, 3), ``bias`` (C_out,).

    Initialised as the official port's layer: weight uniform in +-1/sqrt(9 C_in), bias zero.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, impl: str):
        super().__init__()
        self.stride = stride
        self.impl = impl
        bound = 1.0 / math.sqrt(in_channels * 9)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x (N, C_in, H, W), offset (N, 18, Ho, Wo), mask (N, 9, Ho, Wo) -> (N, C_out, Ho, Wo)."""
        return modulated_deform_conv3x3(x, offset, mask, self.weight, self.bias, self.stride, self.impl)


class DeformConvGN(nn.Module):
    """:class:`ModulatedDeformConv3x3` (``conv``) followed by GroupNorm(16) (``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, impl: str):
        super().__init__()
        self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride, impl)
        self.bn = nn.GroupNorm(16, out_channels)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x (N, C_in, H, W), offset (N, 18, Ho, Wo), mask (N, 9, Ho, Wo) -> (N, C_out, Ho, Wo)."""
        return self.bn(self.conv(x, offset, mask))


class DyConv(nn.Module):
    """One DyHead block over an ordered pyramid (finest level first).

    For level l with features F_l (offsets and masks from a 3x3 conv on F_l: 18 offsets, 9 sigmoid
    masks), the terms are ``DyConv[1](F_l)``, ``DyConv[2](F_{l-1})`` (stride 2, from the finer
    level) and ``upsample(DyConv[0](F_{l+1}))`` (from the coarser level; see
    :func:`coarse_level_offsets` for its offsets). Each term t is weighted by the scale-aware gate
    ``hsigmoid(relu(conv1x1(avgpool(t))))`` in [0.5, 1], the weighted terms are averaged, and the
    task-aware :class:`DyReLU` is applied (unless ``task_attention`` is False: the paper's
    two-stage form moves it into the box head). The offset conv is initialised as PyTorch's default
    (as microsoft/DynamicHead) or, with ``zero_init_offset``, to zero (as mmdetection). The deformable
    convs run ``dcn_impl`` (:func:`resolve_dcn_impl`): by default ``"auto"``, torchvision's kernel on
    CUDA and the gather-based sampling form otherwise (the same function up to float rounding).

    With ``identity_init`` the block is residual, ``F_l + gamma * block(F)_l`` with a per-channel
    ``gamma`` (``residual_scale``, shape (C,)) initialised to zero: it starts as the identity and the
    attentions are blended in as they learn (for training from scratch; the official block has no
    residual and no ``gamma``, so its checkpoints load unchanged without this option).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        coarse_offsets: str = "aligned",
        dcn_impl: str = "auto",
        task_attention: bool = True,
        zero_init_offset: bool = False,
        identity_init: bool = False,
    ):
        super().__init__()
        if coarse_offsets not in COARSE_OFFSET_MODES:
            raise ValueError(
                f"MODEL.DYHEAD.COARSE_OFFSETS must be one of {COARSE_OFFSET_MODES}, got {coarse_offsets!r}"
            )
        if dcn_impl not in DCN_IMPLS:
            raise ValueError(f"DyConv: dcn_impl must be one of {DCN_IMPLS}, got {dcn_impl!r}")
        if in_channels != out_channels:
            raise ValueError(f"DyHead: the block mixes levels and input, so in ({in_channels}) must equal "
                             f"out ({out_channels}) channels")
        self.coarse_offsets = coarse_offsets
        self.dcn_impl = dcn_impl
        # [0]: stride 1 on the coarser level, [1]: the level itself, [2]: stride 2 on the finer level.
        self.DyConv = nn.ModuleList(
            [DeformConvGN(in_channels, out_channels, stride, dcn_impl) for stride in (1, 1, 2)]
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, 1, 1), nn.ReLU(inplace=True)
        )
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(out_channels) if task_attention else nn.Identity()
        self.offset = nn.Conv2d(in_channels, 27, kernel_size=3, padding=1)
        if zero_init_offset:  # regular 3x3 sampling and masks 0.5 at the start (mmdetection's DyHead default)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
        self.residual_scale = nn.Parameter(torch.zeros(out_channels)) if identity_init else None

    def scale_gate(self, term: Tensor) -> Tensor:
        """Scale-aware attention of one term: (N, C, H, W) -> (N, 1, 1, 1) in [0.5, 1]."""
        return self.h_sigmoid(self.AttnConv(term))

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """{name: (N, C, H_l, W_l)} finest first -> same names and shapes (channels-last where the
        ``sampling`` DCN runs)."""
        names: List[str] = list(features)
        levels = [features[k] for k in names]
        # The gather-based DCN reads channels-last maps in place (and returns them): convert once here
        # (a no-op for the previous block's outputs).
        if resolve_dcn_impl(self.dcn_impl, levels[0]) == "sampling":
            levels = [f.contiguous(memory_format=torch.channels_last) for f in levels]
        out = {}
        for i, feature in enumerate(levels):
            offset_mask = self.offset(feature)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            terms = [self.DyConv[1](feature, offset, mask)]
            if i > 0:
                terms.append(self.DyConv[2](levels[i - 1], offset, mask))
            if i < len(levels) - 1:
                coarse = levels[i + 1]
                c_offset, c_mask = coarse_level_offsets(offset, mask, coarse.shape[-2:], self.coarse_offsets)
                term = self.DyConv[0](coarse, c_offset, c_mask)
                terms.append(
                    F.interpolate(term, size=feature.shape[-2:], mode="bilinear", align_corners=True)
                )
            mean = sum(t * self.scale_gate(t) for t in terms) / len(terms)  # keeps the memory format
            block = self.relu(mean)
            if self.residual_scale is not None:
                block = feature + block * self.residual_scale.view(1, -1, 1, 1).to(block.dtype)
            out[names[i]] = block
        return out
