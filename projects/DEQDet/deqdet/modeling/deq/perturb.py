"""Refinement-aware perturbation (RAP): random noise on the state before a no-grad refinement step."""

from typing import Tuple

import torch

from ..query.boxes import xyzr_to_xyxy

__all__ = ["RefinementPerturbation", "encode_jittered_xyxy"]


def encode_jittered_xyxy(xyxy: torch.Tensor, min_size: float = 1.0) -> torch.Tensor:
    """(..., 4) corners that may be flipped by noise -> (..., 4) xyzr, with width and height taken as
    ``|x1 - x0|``, ``|y1 - y0|`` and at least ``min_size`` pixels."""
    wh = (xyxy[..., 2:] - xyxy[..., :2]).abs().clamp(min=min_size)
    centre = 0.5 * (xyxy[..., :2] + xyxy[..., 2:])
    log_wh = torch.log2(wh)
    z = 0.5 * (log_wh[..., 0:1] + log_wh[..., 1:2])
    r = log_wh[..., 1:2] - log_wh[..., 0:1]
    return torch.cat([centre, z, r], dim=-1)


class RefinementPerturbation:
    """``(content, xyzr) -> (content, xyzr)``, each part perturbed with its own probability (one draw
    per call, shared by the batch, as the official code)::

        content <- (1 - content_intensity) * content + content_intensity * ||content|| * eps
        xyzr    <- encode(decode(xyzr) + position_intensity * eps)     # eps ~ N(0, 1); boxes in pixels

    ``||content||`` is the norm of each query's content vector. With both probabilities 0 the call is
    the identity and draws no random numbers.
    """

    def __init__(self, content_prob: float, content_intensity: float, position_prob: float,
                 position_intensity: float):
        for name, p in (("PERTURB_CONTENT_PROB", content_prob), ("PERTURB_POSITION_PROB", position_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MODEL.DEQDET.{name} must be in [0, 1], got {p}")
        self.content_prob, self.content_intensity = content_prob, content_intensity
        self.position_prob, self.position_intensity = position_prob, position_intensity

    @property
    def enabled(self) -> bool:
        return self.content_prob > 0 or self.position_prob > 0

    def __call__(self, content: torch.Tensor, xyzr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """content (B, N, D), xyzr (B, N, 4) -> the same shapes."""
        if self.content_prob > 0 and torch.rand(()) < self.content_prob:
            noise = torch.randn_like(content) * content.norm(dim=-1, keepdim=True)
            content = (1 - self.content_intensity) * content + self.content_intensity * noise
        if self.position_prob > 0 and torch.rand(()) < self.position_prob:
            xyxy = xyzr_to_xyxy(xyzr)
            xyzr = encode_jittered_xyxy(xyxy + self.position_intensity * torch.randn_like(xyxy))
        return content, xyzr
