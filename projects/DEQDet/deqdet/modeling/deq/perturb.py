"""Refinement-aware perturbation (RAP): random noise on the state before a no-grad refinement step."""

from typing import Optional, Tuple

import torch

from ..query.boxes import xyzr_to_xyxy

__all__ = ["RefinementPerturbation", "encode_jittered_xyxy"]


def encode_jittered_xyxy(xyxy: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(..., 4) corners that may be crossed by noise -> (..., 4) xyzr, with width and height taken as
    ``|x1 - x0| + eps`` and ``|y1 - y0| + eps`` (as MCG-NJU/DEQDet)."""
    wh = (xyxy[..., 2:] - xyxy[..., :2]).abs() + eps
    centre = 0.5 * (xyxy[..., :2] + xyxy[..., 2:])
    log_wh = torch.log2(wh)
    z = 0.5 * (log_wh[..., 0:1] + log_wh[..., 1:2])
    r = log_wh[..., 1:2] - log_wh[..., 0:1]
    return torch.cat([centre, z, r], dim=-1)


class RefinementPerturbation:
    """``(content, xyzr) -> (content, xyzr, iof_boxes)``, each part perturbed with its own probability
    (one draw per call, shared by the batch, as the official code)::

        content <- (1 - content_intensity) * content + content_intensity * ||content|| * eps
        corners  = decode(xyzr) + position_intensity * eps        # eps ~ N(0, 1), in pixels
        xyzr    <- encode(corners)                                # |w|, |h| (+ 1e-7)
        iof_boxes = corners

    ``||content||`` is the norm of each query's content vector. Every corner moves by the same amount
    whatever its box's size, and the jittered corners may cross (x1 < x0 or y1 < y0): the next step's
    IoF attention bias uses the raw corners (MCG-NJU/DEQDet), so a crossed box has IoF 0 with every
    box (log-IoF about -16 in its row and column).

    ``iof_boxes`` is None whenever the boxes were not jittered. With both probabilities 0 the call is
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

    def __call__(
        self, content: torch.Tensor, xyzr: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """content (B, N, D), xyzr (B, N, 4) -> the same shapes and iof_boxes (B, N, 4) xyxy or None."""
        iof_boxes = None
        if self.content_prob > 0 and torch.rand(()) < self.content_prob:
            noise = torch.randn_like(content) * content.norm(dim=-1, keepdim=True)
            content = (1 - self.content_intensity) * content + self.content_intensity * noise
        if self.position_prob > 0 and torch.rand(()) < self.position_prob:
            iof_boxes = xyzr_to_xyxy(xyzr) + self.position_intensity * torch.randn_like(xyzr)
            xyzr = encode_jittered_xyxy(iof_boxes)
        return content, xyzr, iof_boxes
