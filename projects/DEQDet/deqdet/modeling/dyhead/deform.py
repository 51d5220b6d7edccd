"""Modulated deformable 3x3 convolution (DCNv2) without a compiled extension.

Two interchangeable implementations of the same function, selected by its ``impl`` argument:

* ``"torchvision"``: :func:`torchvision.ops.deform_conv2d` (CPU and CUDA kernels).
* ``"sampling"``: the same sum written with PyTorch ops: each deformed tap is a bag of its 4
  bilinear corners in the channels-last input, weighted by bilinear weight x mask (0 outside the
  input: DCNv2's zero padding), summed by :func:`torch.nn.functional.embedding_bag` (a vectorised
  weighted gather) into a (3 Ho, 3 Wo) image of 3x3 patches, then a plain 3x3 convolution of stride
  3 with the kernel. About twice as fast as torchvision's kernel on CPU; same output up to float
  rounding (tests compare the two, values and gradients).
* ``"auto"`` (what the DyHead blocks run): ``"torchvision"`` for CUDA inputs, ``"sampling"``
  otherwise: on CUDA torchvision's kernel is the faster and keeps fewer training activations, on CPU
  the sampling form is the faster (`make bench`).

Both take offsets laid out as DCNv2 does: channel ``2k`` is the y offset and ``2k + 1`` the x offset
of tap ``k = 3 i + j`` (row-major over the 3x3 kernel), in pixels of the input.

Also here: how the offsets predicted on one level are given to the DCN that reads the next coarser
level (:func:`coarse_level_offsets`), in the official port's way or geometrically aligned.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d

__all__ = [
    "DCN_IMPLS", "COARSE_OFFSET_MODES", "modulated_deform_conv3x3", "coarse_level_offsets", "resolve_dcn_impl"
]

DCN_IMPLS = ("auto", "sampling", "torchvision")
COARSE_OFFSET_MODES = ("aligned", "official")


def _output_size(size: int, stride: int) -> int:
    """Output length of a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


def _bilinear_bags(offset: Tensor, mask: Tensor, size: Tuple[int, int], stride: int) -> Tuple[Tensor, Tensor]:
    """Where each deformed tap reads the input, as 4 bilinear corners per tap.

    Args:
        offset: (N, 18, Ho, Wo) offsets, (dy, dx) per tap, in input pixels.
        mask: (N, 9, Ho, Wo) modulation scalars.
        size: (H, W) of the input.
        stride: 1 or 2.
    Returns:
        index (N Ho 3 Wo 3, 4) rows of the (N H W, C) channels-last input, and weight (same shape):
        bilinear weight x mask, 0 for a corner outside the input (DCNv2's zero padding). Bags are
        ordered (image, output row, tap row, output column, tap column).
    """
    n, _, ho, wo = offset.shape
    h, w = size
    dtype, device = offset.dtype, offset.device
    taps = torch.arange(-1, 2, dtype=dtype, device=device)
    # Regular-grid position of tap k = 3 i + j at output (y, x): (y * stride + i - 1, x * stride + j - 1).
    base_y = (torch.arange(ho, dtype=dtype, device=device) * stride).view(1, 1, ho, 1) + taps.view(1, 3, 1, 1)
    base_x = (torch.arange(wo, dtype=dtype, device=device) * stride).view(1, 1, 1, wo) + taps.view(1, 3, 1, 1)
    offset = offset.view(n, 9, 2, ho, wo)
    pos_y = offset[:, :, 0] + base_y.repeat_interleave(3, dim=1)
    pos_x = offset[:, :, 1] + base_x.repeat(1, 3, 1, 1)
    y0, x0 = pos_y.floor(), pos_x.floor()
    fy, fx = pos_y - y0, pos_x - x0
    y0, x0 = y0.long(), x0.long()
    image_start = (torch.arange(n, device=device) * (h * w)).view(n, 1, 1, 1)
    index, weight = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            y, x = y0 + dy, x0 + dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            index.append(image_start + y.clamp(0, h - 1) * w + x.clamp(0, w - 1))
            weight.append(wy * wx * mask * inside)
    # (N, 3 (i), 3 (j), Ho, Wo, 4) -> (N, Ho, i, Wo, j, 4): the taps of output (y, x) form the 3 x 3
    # patch at (3y, 3x) of a (3 Ho, 3 Wo) image.
    index = torch.stack(index, dim=-1).view(n, 3, 3, ho, wo, 4).permute(0, 3, 1, 4, 2, 5).reshape(-1, 4)
    weight = torch.stack(weight, dim=-1).view(n, 3, 3, ho, wo, 4).permute(0, 3, 1, 4, 2, 5).reshape(-1, 4)
    return index, weight


def resolve_dcn_impl(impl: str, x: Tensor) -> str:
    """``impl`` (one of :data:`DCN_IMPLS`) -> the implementation that runs on ``x``: ``"auto"`` is
    ``"torchvision"`` on CUDA, ``"sampling"`` elsewhere."""
    if impl not in DCN_IMPLS:
        raise ValueError(f"deformable conv: impl must be one of {DCN_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "torchvision" if x.is_cuda else "sampling"
    return impl


def modulated_deform_conv3x3(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, stride: int, impl: str
) -> Tensor:
    """DCNv2 with a 3x3 kernel, padding 1, dilation 1, one offset group.

    Args:
        x: (N, C, H, W) input.
        offset: (N, 18, Ho, Wo) offsets, Ho = (H - 1) // stride + 1 (same for W).
        mask: (N, 9, Ho, Wo) modulation scalars.
        weight: (O, C, 3, 3); bias: (O,).
        stride: 1 or 2.
        impl: one of :data:`DCN_IMPLS` (:func:`resolve_dcn_impl`).
    Returns:
        (N, O, Ho, Wo); channels-last with the ``"sampling"`` implementation, which reads a
        channels-last ``x`` without copying it.
    """
    if resolve_dcn_impl(impl, x) == "torchvision":
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    n, c = x.shape[:2]
    ho, wo = offset.shape[-2:]
    expected = (_output_size(x.shape[2], stride), _output_size(x.shape[3], stride))
    if (ho, wo) != expected:
        raise ValueError(f"deformable conv: offsets of size {(ho, wo)} for an output of size {expected}")
    index, bag_weight = _bilinear_bags(offset, mask, x.shape[-2:], stride)
    table = x.permute(0, 2, 3, 1).reshape(-1, c)  # (N H W, C) channels-last rows (a view for channels-last x)
    columns = F.embedding_bag(index, table, per_sample_weights=bag_weight, mode="sum")  # (N 3Ho 3Wo, C)
    # The sampled taps as a channels-last (N, C, 3 Ho, 3 Wo) image: a 3x3 conv of stride 3 applies the
    # kernel to each output's taps (oneDNN's convolution is faster here than the equivalent matmul).
    # Its output stays channels-last, ready to be the next deformable conv's table.
    patches = columns.view(n, 3 * ho, 3 * wo, c).permute(0, 3, 1, 2)
    return F.conv2d(patches, weight, bias, stride=3)


def coarse_level_offsets(
    offset: Tensor, mask: Tensor, coarse_size: Tuple[int, int], mode: str
) -> Tuple[Tensor, Tensor]:
    """Offsets and masks predicted on level l, given to the stride-1 DCN that reads level l + 1.

    Args:
        offset: (N, 18, H, W) and mask: (N, 9, H, W), predicted on level l.
        coarse_size: (h, w) of level l + 1, with h = ceil(H / 2), w = ceil(W / 2) as an FPN makes.
        mode: ``"official"``: what microsoft/DynamicHead's CUDA kernel reads when handed the
            level-l tensors for an (h, w) output: per image, the first ``18 h w`` offset values
            (``9 h w`` mask values) of that image's memory, taken as an (18, h, w) array. A memory
            reinterpretation, not a crop; the released weights were trained with it.
            ``"aligned"``: the values at the level-l positions the coarse positions sit on (coarse
            pixel (i, j) is fine pixel (2i, 2j) under the FPN's stride-2 convolutions), used as
            offsets in coarse pixels, as the finer-level DCN uses its offsets in finer pixels.
    Returns:
        offset (N, 18, h, w) and mask (N, 9, h, w).
    """
    n, _, height, width = offset.shape
    h, w = coarse_size
    if mode == "official":
        return (
            offset.reshape(n, -1)[:, : 18 * h * w].view(n, 18, h, w),
            mask.reshape(n, -1)[:, : 9 * h * w].view(n, 9, h, w),
        )
    if mode != "aligned":
        raise ValueError(f"MODEL.DYHEAD.COARSE_OFFSETS must be one of {COARSE_OFFSET_MODES}, got {mode!r}")
    if (h, w) != (_output_size(height, 2), _output_size(width, 2)):
        raise ValueError(
            f"DyHead: level of size {(h, w)} is not the stride-2 successor of a level of size "
            f"{(height, width)}"
        )
    return offset[:, :, ::2, ::2], mask[:, :, ::2, ::2]
