"""Optimizer construction from config (``SOLVER.OPTIMIZER``: ``SGD`` or ``AdamW``).

``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` accepts Detectron2's per-parameter ``value`` / ``norm``
and also ``full_model``: one gradient-norm clip over all parameters together
(``torch.nn.utils.clip_grad_norm_``), as mmdetection's ``grad_clip`` in the official
AdaMixer / DEQDet recipes.
"""

import itertools

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_optimizer as build_d2_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer"]


def _with_full_model_clipping(optimizer_cls: type, max_norm: float) -> type:
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the total gradient norm."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD, or AdamW over Detectron2's parameter groups (norm / bias rules),
    with ``SOLVER.CLIP_GRADIENTS`` applied."""
    name = cfg.SOLVER.OPTIMIZER
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    if name == "SGD" and not full_model_clip:
        return build_d2_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if name == "SGD":
        optimizer_cls = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    elif name == "AdamW":
        optimizer_cls = torch.optim.AdamW
        kwargs = {"betas": tuple(cfg.SOLVER.BETAS)}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'AdamW', got {name!r}")
    if full_model_clip:
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
        return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_cls)(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )
