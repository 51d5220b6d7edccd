"""Adaptive mixing: channel and point mixing with weights generated from each query's content."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptiveMixing"]


class AdaptiveMixing(nn.Module):
    """Mix the sampled points of each query with query-generated matrices.

    Per query and group ``g`` (``Cg = C / G`` channels, ``P_in`` sampled points), with
    ``M_g (Cg x Cg)`` and ``S_g (P_out x P_in)`` produced by ``parameter_generator(content)``::

        h = relu(LN(x_g @ M_g))      # channel mixing, LN over (points, channels), no affine
        h = relu(LN(S_g @ h))        # point mixing
        out = content + out_proj(flatten_g(h))   # (G * P_out * Cg) -> content dim

    With the generator's weight at zero (its initial state) ``M_g`` and ``S_g`` are its bias,
    the same for every query.
    """

    def __init__(
        self, content_dim: int, feat_channels: int, in_points: int, out_points: int, num_groups: int
    ):
        super().__init__()
        if feat_channels % num_groups:
            raise ValueError(f"feature channels ({feat_channels}) must divide into {num_groups} groups")
        self.group_channels = feat_channels // num_groups
        self.in_points = in_points
        self.out_points = out_points
        self.num_groups = num_groups
        self.channel_params = self.group_channels**2
        self.point_params = in_points * out_points
        self.parameter_generator = nn.Linear(
            content_dim, num_groups * (self.channel_params + self.point_params)
        )
        self.out_proj = nn.Linear(num_groups * out_points * self.group_channels, content_dim)

    def mixing_matrices(self, content: torch.Tensor):
        """(B, N, D) content -> M (B, N, G, Cg, Cg) and S (B, N, G, P_out, P_in)."""
        params = self.parameter_generator(content).unflatten(-1, (self.num_groups, -1))
        channel, point = params.split([self.channel_params, self.point_params], dim=-1)
        return (
            channel.unflatten(-1, (self.group_channels, self.group_channels)),
            point.unflatten(-1, (self.out_points, self.in_points)),
        )

    def forward(self, sampled: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """sampled (B, N, G, P_in, Cg), content (B, N, D) -> (B, N, D) updated content."""
        channel_mix, point_mix = self.mixing_matrices(content)
        h = sampled @ channel_mix
        # normalised shapes from the module's sizes, not from h.shape: ONNX export needs them constant
        h = F.relu(F.layer_norm(h, (self.in_points, self.group_channels)))
        h = point_mix @ h
        h = F.relu(F.layer_norm(h, (self.out_points, self.group_channels)))
        return content + self.out_proj(h.flatten(2))
