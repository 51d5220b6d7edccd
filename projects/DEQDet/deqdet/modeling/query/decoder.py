"""Query decoders, chosen by ``MODEL.QUERY.DECODER`` from ``QUERY_DECODER_REGISTRY``.

Every decoder is a :class:`QueryDecoder`: the meta-architectures call only its two entries,
``losses(content, xyzr, features, loss_fn)`` in training and ``predict(content, xyzr, features)`` in
inference. A prediction is ``{"logits": (B, N, K), "boxes": (B, N, 4) xyxy, ...}``, with ``"quality"``
(B, N, 1) predicted-IoU logits when the stages have a quality branch.
"""

from typing import Callable, Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from .stage import AdaMixerStage

__all__ = [
    "QUERY_DECODER_REGISTRY",
    "AdaMixerDecoder",
    "LossFn",
    "QueryDecoder",
    "build_query_decoder",
    "stage_kwargs_from_config",
]

QUERY_DECODER_REGISTRY = Registry("QUERY_DECODER")
QUERY_DECODER_REGISTRY.__doc__ = """
Query decoders: :class:`QueryDecoder` subclasses built as ``cls(cfg, strides)`` (configurable).
"""

#: predictions -> named scalar losses: the set criterion with the images' targets, as the
#: meta-architecture hands it to :meth:`QueryDecoder.losses`.
LossFn = Callable[[List[Dict[str, torch.Tensor]]], Dict[str, torch.Tensor]]


class QueryDecoder(nn.Module):
    """The interface of every decoder in ``QUERY_DECODER_REGISTRY``.

    A subclass implements ``forward(content, xyzr, features) -> [prediction, ...]``, the predictions it
    wants supervised, the last being the detection; it overrides :meth:`losses` when it computes (and
    may backpropagate) its losses itself, and :meth:`predict` when inference differs from the last
    training prediction.
    """

    def losses(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor], loss_fn: LossFn
    ) -> Dict[str, torch.Tensor]:
        """Training: the losses of the decoder's predictions.

        Args:
            content (B, N, D), xyzr (B, N, 4): the initial queries; features: L x (B, C, H_l, W_l).
            loss_fn: predictions list -> ``{"s{i}_loss_*": scalar}`` (the criterion with the targets).

        Returns:
            Named scalar losses (here ``loss_fn`` over :meth:`forward`'s predictions).
        """
        return loss_fn(self(content, xyzr, features))

    def predict(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Inference: the detection, ``{"logits": (B, N, K), "boxes": (B, N, 4) xyxy}`` and any per-image
        extras (B, ...) that the detector returns next to its instances (DEQDecoder: ``residuals``,
        ``steps``). Here the last of :meth:`forward`'s predictions."""
        return self(content, xyzr, features)[-1]


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
        quality=q.QUALITY_WEIGHT > 0,
    )


def build_query_decoder(cfg, strides: Sequence[int]) -> QueryDecoder:
    name = cfg.MODEL.QUERY.DECODER
    if name not in QUERY_DECODER_REGISTRY:
        raise ValueError(
            f"MODEL.QUERY.DECODER {name!r} is not registered; known: {sorted(QUERY_DECODER_REGISTRY)}"
        )
    decoder = QUERY_DECODER_REGISTRY.get(name)(cfg, strides)
    if not isinstance(decoder, QueryDecoder):
        raise TypeError(
            f"MODEL.QUERY.DECODER {name!r} must build a QueryDecoder, got {type(decoder).__name__}"
        )
    return decoder


@QUERY_DECODER_REGISTRY.register()
class AdaMixerDecoder(QueryDecoder):
    """``num_stages`` unshared :class:`AdaMixerStage`, each refining the previous one's queries;
    every stage's prediction is returned (all are supervised in training, the last one detects)."""

    @configurable
    def __init__(self, *, num_stages: int, stage_kwargs: dict):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"MODEL.QUERY.NUM_STAGES must be >= 1, got {num_stages}")
        self.stages = nn.ModuleList(AdaMixerStage(**stage_kwargs) for _ in range(num_stages))

    @classmethod
    def from_config(cls, cfg, strides):
        return {
            "num_stages": cfg.MODEL.QUERY.NUM_STAGES,
            "stage_kwargs": stage_kwargs_from_config(cfg, strides),
        }

    def forward(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """content (B, N, D), xyzr (B, N, 4), features L x (B, C, H_l, W_l) -> per-stage predictions."""
        outputs = []
        for stage in self.stages:
            out = stage(content, xyzr, features)
            content, xyzr = out.content, out.xyzr
            outputs.append(out.prediction())
        return outputs
