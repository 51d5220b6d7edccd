"""Refinement-aware perturbation (RAP): random noise on the state before a no-grad refinement step."""

from typing import Optional, Tuple

import torch

from ..query.boxes import xyzr_to_xyxy

__all__ = ["POSITION_MODES", "POSITION_UNITS", "RefinementPerturbation", "encode_jittered_xyxy"]

# MODEL.DEQDET.PERTURB_POSITION_MODE values (RefinementPerturbation).
POSITION_MODES = ("official", "clamped")
# MODEL.DEQDET.PERTURB_POSITION_UNIT values: what one unit of PERTURB_POSITION_INTENSITY is.
POSITION_UNITS = ("pixels", "box")


def encode_jittered_xyxy(xyxy: torch.Tensor, min_size: float = 1.0, eps: float = 0.0) -> torch.Tensor:
    """(..., 4) corners that may be crossed by noise -> (..., 4) xyzr, with width and height taken as
    ``max(|x1 - x0|, min_size) + eps`` and ``max(|y1 - y0|, min_size) + eps``."""
    wh = (xyxy[..., 2:] - xyxy[..., :2]).abs().clamp(min=min_size) + eps
    centre = 0.5 * (xyxy[..., :2] + xyxy[..., 2:])
    log_wh = torch.log2(wh)
    z = 0.5 * (log_wh[..., 0:1] + log_wh[..., 1:2])
    r = log_wh[..., 1:2] - log_wh[..., 0:1]
    return torch.cat([centre, z, r], dim=-1)


class RefinementPerturbation:
    """``(content, xyzr) -> (content, xyzr, iof_boxes)``, each part perturbed with its own probability
    (one draw per call, shared by the batch, as the official code)::

        content <- (1 - content_intensity) * content + content_intensity * ||content|| * eps
        corners  = decode(xyzr) + position_intensity * unit * eps        # eps ~ N(0, 1)

    ``||content||`` is the norm of each query's content vector. ``unit`` (``position_unit``) is one
    pixel (``"pixels"``, official: the same jitter for every box) or the box's own (w, h, w, h)
    (``"box"``: each corner moves in proportion to its box, as DN-DETR's box noise). The jittered
    corners may cross (x1 < x0 or y1 < y0). ``position_mode`` says what the next step sees:

    - ``"official"`` (MCG-NJU/DEQDet): ``xyzr <- encode(corners)`` with ``|w|, |h|`` (+ 1e-7), and
      ``iof_boxes = corners``: the stage's IoF attention bias uses the raw corners, so a crossed box
      has IoF 0 with every box (log-IoF about -16 in its row and column).
    - ``"clamped"``: ``xyzr <- encode(corners)`` with ``|w|, |h|`` of at least 1 px, and
      ``iof_boxes = None``: the bias uses that re-encoded box, which takes part normally.

    ``iof_boxes`` is None whenever the boxes were not jittered. With both probabilities 0 the call is
    the identity and draws no random numbers.
    """

    def __init__(self, content_prob: float, content_intensity: float, position_prob: float,
                 position_intensity: float, position_mode: str = "official",
                 position_unit: str = "pixels"):
        for name, p in (("PERTURB_CONTENT_PROB", content_prob), ("PERTURB_POSITION_PROB", position_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MODEL.DEQDET.{name} must be in [0, 1], got {p}")
        if position_mode not in POSITION_MODES:
            raise ValueError(f"MODEL.DEQDET.PERTURB_POSITION_MODE must be one of {POSITION_MODES}, "
                             f"got {position_mode!r}")
        if position_unit not in POSITION_UNITS:
            raise ValueError(f"MODEL.DEQDET.PERTURB_POSITION_UNIT must be one of {POSITION_UNITS}, "
                             f"got {position_unit!r}")
        self.position_unit = position_unit
        self.content_prob, self.content_intensity = content_prob, content_intensity
        self.position_prob, self.position_intensity = position_prob, position_intensity
        self.position_mode = position_mode

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
            xyxy = xyzr_to_xyxy(xyzr)
            scale = self.position_intensity
            if self.position_unit == "box":
                wh = xyxy[..., 2:] - xyxy[..., :2]
                scale = scale * torch.cat([wh, wh], dim=-1)
            corners = xyxy + scale * torch.randn_like(xyxy)
            if self.position_mode == "official":
                xyzr, iof_boxes = encode_jittered_xyxy(corners, min_size=0.0, eps=1e-7), corners
            else:
                xyzr = encode_jittered_xyxy(corners)
        return content, xyzr, iof_boxes
