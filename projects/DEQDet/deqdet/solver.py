"""Optimizer construction from config (``SOLVER.OPTIMIZER``: ``SGD`` or ``AdamW``).

``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` accepts Detectron2's per-parameter ``value`` / ``norm``
and also ``full_model``: one gradient-norm clip over all parameters together
(``torch.nn.utils.clip_grad_norm_``), as mmdetection's ``grad_clip`` in the official
AdaMixer / DEQDet recipes.

``SOLVER.{BACKBONE,HEAD}_{LR,WEIGHT_DECAY}_MULTIPLIER`` scale the learning rate and weight decay of
the parameters of ``model.backbone`` and of all other parameters (DEQDet: head lr x4, decay x10).
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


def split_backbone_and_head(groups: list, model: torch.nn.Module, cfg: CfgNode) -> list:
    """Split each parameter group into its backbone and head parameters, scaling their ``lr`` and
    ``weight_decay`` by the ``SOLVER.*_MULTIPLIER`` keys. A model without ``backbone`` is all head."""
    s = cfg.SOLVER
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, torch.nn.Module) else set()
    factors = {
        True: (s.BACKBONE_LR_MULTIPLIER, s.BACKBONE_WEIGHT_DECAY_MULTIPLIER),
        False: (s.HEAD_LR_MULTIPLIER, s.HEAD_WEIGHT_DECAY_MULTIPLIER),
    }
    split = []
    for group in groups:
        for in_backbone, (lr_factor, wd_factor) in factors.items():
            params = [p for p in group["params"] if (id(p) in backbone_ids) == in_backbone]
            if params:
                split.append(
                    {**group, "params": params, "lr": group["lr"] * lr_factor,
                     "weight_decay": group["weight_decay"] * wd_factor}
                )
    return split


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD, or AdamW over Detectron2's parameter groups (norm / bias rules) split into
    backbone and head, with ``SOLVER.CLIP_GRADIENTS`` applied."""
    name = cfg.SOLVER.OPTIMIZER
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    multipliers = (cfg.SOLVER.BACKBONE_LR_MULTIPLIER, cfg.SOLVER.BACKBONE_WEIGHT_DECAY_MULTIPLIER,
                   cfg.SOLVER.HEAD_LR_MULTIPLIER, cfg.SOLVER.HEAD_WEIGHT_DECAY_MULTIPLIER)
    if name == "SGD" and not full_model_clip and multipliers == (1.0, 1.0, 1.0, 1.0):
        return build_d2_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    params = split_backbone_and_head(params, model, cfg)
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
