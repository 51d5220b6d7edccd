"""Adaptive 3D sampling: points placed relative to each query's box, read from every feature level
by bilinear interpolation and blended across levels by their distance in scale (``z``)."""

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..constants import device_constant
from .boxes import xyzr_wh

__all__ = ["sampling_points", "level_weights", "sample_3d"]


def sampling_points(offsets: torch.Tensor, xyzr: torch.Tensor) -> torch.Tensor:
    """Place points relative to the boxes.

    Args:
        offsets: (B, N, K, 3) per point ``(dx, dy, dz)``; ``dx, dy`` in units of the box width and
            height, ``dz`` in units of ``z`` (log2 of the box size).
        xyzr: (B, N, 4) boxes.

    Returns:
        (B, N, K, 3) points ``(x, y, z)``: x, y in image pixels, z on the log2-pixel scale.
    """
    xy = xyzr[:, :, None, :2] + offsets[..., :2] * xyzr_wh(xyzr)[:, :, None, :]
    z = xyzr[:, :, None, 2:3] + offsets[..., 2:3]
    return torch.cat([xy, z], dim=-1)


def level_weights(z: torch.Tensor, strides: Sequence[int], tau: float = 2.0) -> torch.Tensor:
    """(...) point scales -> (..., L) weights ``softmax_l(-(z - log2 stride_l)**2 / tau)``."""
    log_strides = device_constant([math.log2(s) for s in strides], z)
    return torch.softmax(-((z[..., None] - log_strides) ** 2) / tau, dim=-1)


def _sample_levels_grid(points, features, strides, num_groups, weights) -> torch.Tensor:
    """:func:`sample_3d` with one ``grid_sample`` per level on (B * G, C / G, H, W) views of NCHW maps."""
    batch, num_queries, num_points, _ = points.shape
    points_per_group = num_points // num_groups
    # (B * G, N, P, ...) so that each group samples its own channel slice.
    grouped = points.view(batch, num_queries, num_groups, points_per_group, 3).transpose(1, 2)
    grouped = grouped.reshape(batch * num_groups, num_queries, points_per_group, 3)
    weights = weights.view(batch, num_queries, num_groups, points_per_group, -1).transpose(1, 2)
    weights = weights.reshape(batch * num_groups, 1, num_queries, points_per_group, -1)
    out = 0
    for level, (feature, stride) in enumerate(zip(features, strides)):
        channels, height, width = feature.shape[1:]
        extent = device_constant([width * stride, height * stride], grouped)
        grid = 2.0 * grouped[..., :2] / extent - 1.0
        value = feature.reshape(batch * num_groups, channels // num_groups, height, width)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + sampled * weights[..., level]  # (B * G, C / G, N, P)
    out = out.view(batch, num_groups, -1, num_queries, points_per_group)
    return out.permute(0, 3, 1, 4, 2)


def _sample_levels_gather(points, features, strides, num_groups, weights) -> torch.Tensor:
    """:func:`sample_3d` on channels-last maps: per level ONE weighted gather
    (:func:`torch.nn.functional.embedding_bag`) of the 4 bilinear corners of every point from the map
    viewed as a (B H W G, C / G) table (a view, no copy), the level weight folded into the corner
    weights; the result comes out in the (B, N, G, P, C / G) layout the mixing reads."""
    batch, num_queries, num_points, _ = points.shape
    device = points.device
    # (G * P,) group of each point; expand, not repeat_interleave, whose repeat count becomes a host
    # tensor under tracing (fvcore's FLOP count, export) and then fails on CUDA.
    group = torch.arange(num_groups, device=device)[:, None]
    group = group.expand(num_groups, num_points // num_groups).reshape(-1)
    image = torch.arange(batch, device=device).view(batch, 1, 1)
    out = 0
    for level, (feature, stride) in enumerate(zip(features, strides)):
        channels, height, width = feature.shape[1:]
        table = feature.permute(0, 2, 3, 1).view(-1, channels // num_groups)
        # Pixel (i, j) is centred at ((j + 0.5) * stride, (i + 0.5) * stride), as for grid_sample.
        u, v = points[..., 0] / stride - 0.5, points[..., 1] / stride - 0.5
        x0, y0 = u.floor(), v.floor()
        fx, fy = u - x0, v - y0
        index, weight = [], []
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                x, y = x0 + dx, y0 + dy
                inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)  # False for NaN too: zero padding
                x, y = torch.where(inside, x, 0).long(), torch.where(inside, y, 0).long()
                index.append(((image * height + y) * width + x) * num_groups + group)
                weight.append(torch.where(inside, wy * wx * weights[..., level], 0))
        index, weight = torch.stack(index, dim=-1).view(-1, 4), torch.stack(weight, dim=-1).view(-1, 4)
        out = out + F.embedding_bag(index, table, per_sample_weights=weight.to(table.dtype), mode="sum")
    return out.view(batch, num_queries, num_groups, num_points // num_groups, -1)


def sample_3d(
    points: torch.Tensor, features: List[torch.Tensor], strides: Sequence[int], num_groups: int,
    tau: float = 2.0,
) -> torch.Tensor:
    """Read grouped features at 3D points.

    Args:
        points: (B, N, G * P, 3) points from :func:`sampling_points`; points ``g * P .. g * P + P - 1``
            belong to group ``g``.
        features: L maps (B, C, H_l, W_l); pixel ``(i, j)`` of level ``l`` is centred at image
            position ``((j + 0.5) * stride_l, (i + 0.5) * stride_l)``. Channels-last maps (as
            :class:`~deqdet.modeling.query.neck.ChannelMapper` returns) are read, when no gradient
            is needed (inference, DEQDet's no-grad refinement steps), by one weighted gather per
            level; otherwise by one ``grid_sample`` per level. Both give the same values and
            gradients up to float rounding.
        strides: L strides.
        num_groups: G; group ``g`` reads channels ``g * C / G .. (g + 1) * C / G - 1``.

    Returns:
        (B, N, G, P, C / G): per level bilinear samples (zeros outside the map) weighted by
        :func:`level_weights` of the points' z, summed over levels.
    """
    weights = level_weights(points[..., 2], strides, tau)  # (B, N, G * P, L)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (points, *features))
    # The gather's backward (embedding_bag's) is slower on CPU than grid_sample's: gather without grad only.
    if not needs_grad and all(f.is_contiguous(memory_format=torch.channels_last) for f in features):
        return _sample_levels_gather(points, features, strides, num_groups, weights)
    return _sample_levels_grid(points, features, strides, num_groups, weights)
