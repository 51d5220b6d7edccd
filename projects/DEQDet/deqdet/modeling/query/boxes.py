"""Boxes in AdaMixer's xyzr form.

``xyzr = (x, y, z, r)``: box centre ``x, y`` in pixels, ``z = log2(sqrt(w * h))`` (scale) and
``r = log2(h / w)`` (aspect ratio), so ``w = 2**(z - r/2)`` and ``h = 2**(z + r/2)``.
"""

import math

import torch

from ..constants import device_constant

__all__ = [
    "xyzr_to_xyxy", "xyxy_to_xyzr", "xyzr_wh", "refine_xyzr", "pairwise_iof", "xyzr_position_embedding"
]


def xyzr_wh(xyzr: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzr -> (..., 2) box width and height."""
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    return torch.cat([2.0 ** (z - 0.5 * r), 2.0 ** (z + 0.5 * r)], dim=-1)


def xyzr_to_xyxy(xyzr: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzr -> (..., 4) corners ``x0, y0, x1, y1``."""
    half = 0.5 * xyzr_wh(xyzr)
    centre = xyzr[..., :2]
    return torch.cat([centre - half, centre + half], dim=-1)


def xyxy_to_xyzr(xyxy: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> (..., 4) xyzr. Boxes must have positive width and height."""
    wh = xyxy[..., 2:] - xyxy[..., :2]
    centre = 0.5 * (xyxy[..., :2] + xyxy[..., 2:])
    z = 0.5 * torch.log2(wh[..., 0:1] * wh[..., 1:2])
    r = torch.log2(wh[..., 1:2] / wh[..., 0:1])
    return torch.cat([centre, z, r], dim=-1)


def refine_xyzr(xyzr: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Apply a (..., 4) delta: the centre moves by ``(dx, dy) * 2**z`` pixels, ``z`` and ``r`` add
    ``dz`` and ``dr``."""
    xy = xyzr[..., :2] + delta[..., :2] * 2.0 ** xyzr[..., 2:3]
    return torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


def pairwise_iof(boxes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N, 4) xyxy -> (B, N, N) intersection over foreground: ``|b_i & b_j| / |b_i|``."""
    lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1)
    return inter / area.clamp(min=eps)[..., :, None]


def xyzr_position_embedding(xyzr: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(B, N, 4) xyzr -> (B, N, dim) sinusoidal embedding, ``dim / 4`` features per coordinate.

    ``x, y`` are divided by 1000 first. For each coordinate ``v`` and pair ``k`` the features are
    ``sin(v / T**(2k / d)), cos(v / T**(2k / d))`` with ``d = dim / 4``; coordinates follow each other
    in the order x, y, z, r (the official layout, so converted weights see the same embedding).
    """
    if dim % 8:
        raise ValueError(f"the position embedding needs a content dim divisible by 8, got {dim}")
    per_coord = dim // 4
    scaled = xyzr / device_constant([1000.0, 1000.0, 1.0, 1.0], xyzr)
    freq = torch.exp(
        -math.log(temperature) * 2
        * torch.arange(per_coord // 2, device=xyzr.device, dtype=xyzr.dtype) / per_coord
    )
    angles = scaled[..., None] * freq  # (B, N, 4, per_coord / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(2)
