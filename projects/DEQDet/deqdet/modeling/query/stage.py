"""One AdaMixer decoder stage, a standalone module without hidden state."""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .boxes import pairwise_iof, refine_xyzr, xyzr_position_embedding, xyzr_to_xyxy
from .mixing import AdaptiveMixing
from .sampling import sample_3d, sampling_points

__all__ = ["AdaMixerStage", "StageOutput"]


class StageOutput(NamedTuple):
    """What :class:`AdaMixerStage` returns: the refined queries and their prediction."""

    content: torch.Tensor  #: (B, N, D) query content
    xyzr: torch.Tensor  #: (B, N, 4) refined boxes (xyzr)
    logits: torch.Tensor  #: (B, N, K) class logits
    boxes: torch.Tensor  #: (B, N, 4) the refined boxes as xyxy input-image pixels
    quality: Optional[torch.Tensor] = None  #: (B, N, 1) predicted-IoU logits, or None (no quality branch)

    def prediction(self) -> Dict[str, torch.Tensor]:
        """``{"logits": ..., "boxes": ...[, "quality": ...]}``, the form a decoder's predictions take
        (``query.decoder``)."""
        out = {"logits": self.logits, "boxes": self.boxes}
        return out if self.quality is None else {**out, "quality": self.quality}


def _linear_ln_relu(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))


class AdaMixerStage(nn.Module):
    """Self-attention with IoF bias -> adaptive 3D sampling + mixing -> FFN -> class and box heads.

    ``forward(content, xyzr, features) -> StageOutput(content, xyzr, logits, boxes, quality)``::

        q = LN(q + pe + MHA(q + pe, bias = tau_h * log(IoF + 1e-7)))     # pe = embedding of xyzr
        q = LN(q + AdaptiveMixing(sample_3d(points(q, xyzr)), q))
        q = LN(q + FFN(q))
        logits = fc_cls(cls_fcs(q)); xyzr' = refine(xyzr, fc_reg(reg_fcs(q)))
        quality = fc_quality(reg_fcs(q))                                 # with ``quality`` only

    The incoming boxes are detached: gradients flow through the content, not along the box chain.
    ``quality`` adds a predicted-IoU branch on the regression features (IoU-aware RetinaNet, IoU-Net):
    one logit per query for the IoU of its refined box with its object, zero-initialised (0.5).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        strides: Sequence[int],
        content_dim: int = 256,
        feat_channels: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        in_points: int = 32,
        out_points: int = 128,
        num_groups: int = 4,
        level_tau: float = 2.0,
        quality: bool = False,
    ):
        super().__init__()
        self.strides = tuple(strides)
        self.num_groups = num_groups
        self.in_points = in_points
        self.level_tau = level_tau
        self.attention = nn.MultiheadAttention(content_dim, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(content_dim)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.sampling_offsets = nn.Linear(content_dim, num_groups * in_points * 3)
        self.mixing = AdaptiveMixing(content_dim, feat_channels, in_points, out_points, num_groups)
        self.mixing_norm = nn.LayerNorm(content_dim)
        self.ffn = nn.Sequential(
            nn.Linear(content_dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, content_dim)
        )
        self.ffn_norm = nn.LayerNorm(content_dim)
        self.cls_fcs = _linear_ln_relu(content_dim)
        self.fc_cls = nn.Linear(content_dim, num_classes)
        self.reg_fcs = _linear_ln_relu(content_dim)
        self.fc_reg = nn.Linear(content_dim, 4)
        self.fc_quality = nn.Linear(content_dim, 1) if quality else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """The official initialisation (MCG-NJU/AdaMixer): Xavier-uniform weights in every Linear, the
        classifier bias at the prior probability ``prior_prob``, a zero box regressor (and quality
        branch), IoF temperatures uniform in [0, 4], sampling offsets with zero weights and biases on a
        regular grid over the box (uniform in it when ``in_points`` is not a square) at level offset -1,
        and zero weights in the generator of the mixing parameters."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
                nn.init.xavier_uniform_(module.weight)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        if self.fc_quality is not None:
            nn.init.zeros_(self.fc_quality.weight)
            nn.init.zeros_(self.fc_quality.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        nn.init.zeros_(self.sampling_offsets.weight)
        bias = self.sampling_offsets.bias.view(self.num_groups, self.in_points, 3)
        side = int(round(self.in_points**0.5))
        if side * side == self.in_points:  # a regular side x side grid over the box
            centres = (torch.arange(side, dtype=bias.dtype) + 0.5) / side - 0.5
            grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
            # The official code stores the row coordinate first; kept so converted weights agree.
            bias[..., 0] = grid_y.flatten()
            bias[..., 1] = grid_x.flatten()
        else:
            nn.init.uniform_(bias[..., :2], -0.5, 0.5)
        bias[..., 2] = -1.0
        nn.init.zeros_(self.mixing.parameter_generator.weight)

    def self_attention(self, content: torch.Tensor, xyzr: torch.Tensor,
                       iof_boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, D) content, (B, N, 4) xyzr -> (B, N, D); the position embedding stays in the output.
        The IoF bias comes from ``iof_boxes`` (B, N, 4) xyxy when given, else from the decoded xyzr."""
        with torch.no_grad():
            corners = xyzr_to_xyxy(xyzr) if iof_boxes is None else iof_boxes
            log_iof = torch.log(pairwise_iof(corners) + 1e-7)  # (B, N, N)
            pe = xyzr_position_embedding(xyzr, content.shape[-1])
        bias = (log_iof[:, None] * self.iof_tau[None, :, None, None]).flatten(0, 1)  # (B * heads, N, N)
        query = content + pe
        attended, _ = self.attention(query, query, query, attn_mask=bias, need_weights=False)
        return self.attention_norm(query + attended)

    def sample_and_mix(self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]):
        """(B, N, D) content -> (B, N, D) after 3D sampling around the boxes and adaptive mixing."""
        offsets = self.sampling_offsets(content).unflatten(-1, (-1, 3))  # (B, N, G * P_in, 3)
        points = sampling_points(offsets, xyzr)
        sampled = sample_3d(points, features, self.strides, self.num_groups, self.level_tau)
        return self.mixing_norm(self.mixing(sampled, content))

    def forward(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor],
        iof_boxes: Optional[torch.Tensor] = None,
    ) -> StageOutput:
        """
        Args:
            content: (B, N, D) query content.
            xyzr: (B, N, 4) query boxes (detached here).
            features: L maps (B, C, H_l, W_l) at ``strides``.
            iof_boxes: (B, N, 4) xyxy corners for the IoF attention bias in place of the decoded xyzr
                (DEQDet's official box jitter, whose corners may cross); None: the decoded xyzr.

        Returns:
            :class:`StageOutput`: content (B, N, D), refined xyzr (B, N, 4), class logits (B, N, K),
            boxes (B, N, 4) xyxy in input-image pixels (the refined xyzr decoded), predicted-IoU logits
            (B, N, 1) or None.
        """
        xyzr = xyzr.detach()
        content = self.self_attention(content, xyzr, iof_boxes)
        content = self.sample_and_mix(content, xyzr, features)
        content = self.ffn_norm(content + self.ffn(content))
        logits = self.fc_cls(self.cls_fcs(content))
        reg_features = self.reg_fcs(content)
        xyzr = refine_xyzr(xyzr, self.fc_reg(reg_features))
        quality = None if self.fc_quality is None else self.fc_quality(reg_features)
        return StageOutput(content, xyzr, logits, xyzr_to_xyxy(xyzr), quality)
