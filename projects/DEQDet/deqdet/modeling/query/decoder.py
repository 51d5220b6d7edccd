"""Query decoders, chosen by ``MODEL.QUERY.DECODER`` from ``QUERY_DECODER_REGISTRY``.

A decoder maps the initial queries and the feature maps to the list of predictions it wants
supervised (in training) and whose last entry is the detection (in inference):
``decoder(content, xyzr, features) -> [{"logits": (B, N, K), "boxes": (B, N, 4) xyxy}, ...]``.
"""

from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from .stage import AdaMixerStage

__all__ = ["QUERY_DECODER_REGISTRY", "build_query_decoder", "AdaMixerDecoder", "stage_kwargs_from_config"]

QUERY_DECODER_REGISTRY = Registry("QUERY_DECODER")
QUERY_DECODER_REGISTRY.__doc__ = """
Query decoders: ``cls(cfg, strides)`` (configurable), called as ``decoder(content, xyzr, features)``.
"""


def stage_kwargs_from_config(cfg, strides: Sequence[int]) -> dict:
    """Keyword arguments of :class:`AdaMixerStage` from ``MODEL.QUERY``."""
    q = cfg.MODEL.QUERY
    return dict(
        num_classes=q.NUM_CLASSES,
        strides=tuple(strides),
        content_dim=q.CONTENT_DIM,
        feat_channels=q.FEAT_CHANNELS,
        num_heads=q.NUM_HEADS,
        ffn_dim=q.FFN_DIM,
        in_points=q.IN_POINTS,
        out_points=q.OUT_POINTS,
        num_groups=q.NUM_GROUPS,
        level_tau=q.LEVEL_TAU,
    )


def build_query_decoder(cfg, strides: Sequence[int]) -> nn.Module:
    name = cfg.MODEL.QUERY.DECODER
    if name not in QUERY_DECODER_REGISTRY:
        raise ValueError(f"MODEL.QUERY.DECODER {name!r} is not registered; known: {sorted(QUERY_DECODER_REGISTRY)}")
    return QUERY_DECODER_REGISTRY.get(name)(cfg, strides)


@QUERY_DECODER_REGISTRY.register()
class AdaMixerDecoder(nn.Module):
    """``num_stages`` unshared :class:`AdaMixerStage`, each refining the previous one's queries;
    every stage's prediction is returned (all are supervised in training)."""

    @configurable
    def __init__(self, *, num_stages: int, stage_kwargs: dict):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"MODEL.QUERY.NUM_STAGES must be >= 1, got {num_stages}")
        self.stages = nn.ModuleList(AdaMixerStage(**stage_kwargs) for _ in range(num_stages))

    @classmethod
    def from_config(cls, cfg, strides):
        return {"num_stages": cfg.MODEL.QUERY.NUM_STAGES, "stage_kwargs": stage_kwargs_from_config(cfg, strides)}

    def forward(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """content (B, N, D), xyzr (B, N, 4), features L x (B, C, H_l, W_l) -> per-stage predictions."""
        outputs = []
        for stage in self.stages:
            content, xyzr, logits, boxes = stage(content, xyzr, features)
            outputs.append({"logits": logits, "boxes": boxes})
        return outputs
