"""Adaptive 3D sampling: points placed relative to each query's box, read from every feature level
by bilinear interpolation and blended across levels by their distance in scale (``z``)."""

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F

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
    log_strides = z.new_tensor([math.log2(s) for s in strides])
    return torch.softmax(-((z[..., None] - log_strides) ** 2) / tau, dim=-1)


def sample_3d(
    points: torch.Tensor, features: List[torch.Tensor], strides: Sequence[int], num_groups: int, tau: float = 2.0
) -> torch.Tensor:
    """Read grouped features at 3D points.

    Args:
        points: (B, N, G * P, 3) points from :func:`sampling_points`; points ``g * P .. g * P + P - 1``
            belong to group ``g``.
        features: L maps (B, C, H_l, W_l); pixel ``(i, j)`` of level ``l`` is centred at image
            position ``((j + 0.5) * stride_l, (i + 0.5) * stride_l)``.
        strides: L strides.
        num_groups: G; group ``g`` reads channels ``g * C / G .. (g + 1) * C / G - 1``.

    Returns:
        (B, N, G, P, C / G): per level bilinear samples (zeros outside the map) weighted by
        :func:`level_weights` of the points' z, summed over levels.
    """
    batch, num_queries, num_points, _ = points.shape
    points_per_group = num_points // num_groups
    weights = level_weights(points[..., 2], strides, tau)  # (B, N, G * P, L)
    # (B * G, N, P, ...) so that each group samples its own channel slice.
    grouped = points.view(batch, num_queries, num_groups, points_per_group, 3).transpose(1, 2)
    grouped = grouped.reshape(batch * num_groups, num_queries, points_per_group, 3)
    weights = weights.view(batch, num_queries, num_groups, points_per_group, -1).transpose(1, 2)
    weights = weights.reshape(batch * num_groups, 1, num_queries, points_per_group, -1)
    out = 0
    for level, (feature, stride) in enumerate(zip(features, strides)):
        channels, height, width = feature.shape[1:]
        extent = grouped.new_tensor([width * stride, height * stride])
        grid = 2.0 * grouped[..., :2] / extent - 1.0
        value = feature.reshape(batch * num_groups, channels // num_groups, height, width)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + sampled * weights[..., level]  # (B * G, C / G, N, P)
    out = out.view(batch, num_groups, -1, num_queries, points_per_group)
    return out.permute(0, 3, 1, 4, 2)
