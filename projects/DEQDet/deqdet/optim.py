"""Optimizer construction from config (``SOLVER.OPTIMIZER``: ``SGD`` or ``AdamW``).

``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` accepts Detectron2's per-parameter ``value`` / ``norm``
and also ``full_model``: one gradient-norm clip over all parameters together
(``torch.nn.utils.clip_grad_norm_``), as mmdetection's ``grad_clip`` in the official
AdaMixer / DEQDet recipes.

``SOLVER.PARAM_GROUP_RULES`` multiplies the learning rate and weight decay of the parameters whose
names match a pattern (:func:`rule_multipliers`), as mmdetection's ``paramwise_cfg`` ``custom_keys``:
DEQDet's recipe gives its decoder stages lr x4 and decay x10. ``WEIGHT_DECAY_NORM`` also applies to
the project's norms (:mod:`deqdet.modeling.norm`), which Detectron2's parameter groups do not know.
"""

import itertools
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)

from .errors import UserInputError
from .modeling.norm import PROJECT_NORMS

__all__ = ["build_optimizer", "rule_multipliers"]


OPTIMIZER_IMPLS = ("", "foreach", "fused")


def _with_full_model_clipping(optimizer_cls: type, max_norm: float, foreach: Optional[bool] = None) -> type:
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the total gradient norm (``foreach``:
    as :func:`torch.nn.utils.clip_grad_norm_`'s)."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def _compile_rules(rules: Sequence) -> list:
    """``SOLVER.PARAM_GROUP_RULES`` -> ``[(compiled regex, lr_mult, decay_mult)]``, checked."""
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 3 and isinstance(rule[0], str)
                and all(isinstance(m, (int, float)) and m >= 0 for m in rule[1:])):
            raise UserInputError(f"SOLVER.PARAM_GROUP_RULES: each rule must be [regex, lr_mult, decay_mult] "
                                 f"with multipliers >= 0, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), float(rule[1]), float(rule[2])))
        except re.error as e:
            raise UserInputError(f"SOLVER.PARAM_GROUP_RULES: bad regex {rule[0]!r}: {e}") from e
    return compiled


def rule_multipliers(model: torch.nn.Module, rules: Sequence) -> Dict[int, Tuple[float, float]]:
    """``id(parameter) -> (lr_mult, decay_mult)`` of the first rule whose regex ``re.search``-es the
    parameter's name in ``model.named_parameters()``; parameters no rule matches are left out (1, 1).

    Raises:
        UserInputError: a malformed rule, or a rule that matches no parameter (a misspelt name).
    """
    compiled = _compile_rules(rules)
    multipliers, used = {}, set()
    for name, param in model.named_parameters():
        for index, (regex, lr_mult, decay_mult) in enumerate(compiled):
            if regex.search(name):
                multipliers[id(param)] = (lr_mult, decay_mult)
                used.add(index)
                break
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused:
        raise UserInputError(f"SOLVER.PARAM_GROUP_RULES: {unused} match no parameter name of the model")
    return multipliers


def _project_norm_decay(model: torch.nn.Module, cfg: CfgNode) -> Dict[int, float]:
    """``id(parameter) -> WEIGHT_DECAY_NORM`` for the parameters of the project's norms (the bias
    keeps ``WEIGHT_DECAY_BIAS`` when set, as in Detectron2's groups)."""
    s = cfg.SOLVER
    if s.WEIGHT_DECAY_NORM is None:
        return {}
    norm_types = tuple(PROJECT_NORMS.values())
    return {
        id(param): s.WEIGHT_DECAY_NORM
        for module in model.modules() if isinstance(module, norm_types)
        for name, param in module.named_parameters(recurse=False)
        if not (name == "bias" and s.WEIGHT_DECAY_BIAS is not None)
    }


def split_param_groups(groups: list, model: torch.nn.Module, cfg: CfgNode) -> list:
    """Split Detectron2's parameter groups by the ``SOLVER.PARAM_GROUP_RULES`` multipliers (and the
    project norms' decay), scaling each part's ``lr`` and ``weight_decay``."""
    multipliers = rule_multipliers(model, cfg.SOLVER.PARAM_GROUP_RULES)
    norm_decay = _project_norm_decay(model, cfg)
    split = []
    for group in groups:
        parts = {}
        for p in group["params"]:
            key = (*multipliers.get(id(p), (1.0, 1.0)), norm_decay.get(id(p), group["weight_decay"]))
            parts.setdefault(key, []).append(p)
        for (lr_mult, decay_mult, decay), params in parts.items():
            split.append({**group, "params": params, "lr": group["lr"] * lr_mult,
                          "weight_decay": decay * decay_mult})
    return reduce_param_groups(split)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (as Detectron2's) or AdamW over Detectron2's parameter groups (norm / bias rules) split by
    ``SOLVER.PARAM_GROUP_RULES``, with ``SOLVER.CLIP_GRADIENTS`` applied; ``SOLVER.OPTIMIZER_IMPL``
    picks PyTorch's per-parameter, ``foreach`` or ``fused`` implementation of the same update."""
    name = cfg.SOLVER.OPTIMIZER
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    params = split_param_groups(params, model, cfg)
    if name == "SGD":
        optimizer_cls = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    elif name == "AdamW":
        optimizer_cls = torch.optim.AdamW  # PyTorch's default betas (0.9, 0.999), as AdaMixer / DEQDet
        kwargs = {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'AdamW', got {name!r}")
    impl = cfg.SOLVER.OPTIMIZER_IMPL
    if impl not in OPTIMIZER_IMPLS:
        raise UserInputError(f"SOLVER.OPTIMIZER_IMPL must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    if impl == "fused" and clip.ENABLED and cfg.SOLVER.AMP.ENABLED:
        # under AMP a fused step takes the still-scaled gradients, which the clipping would then read
        raise UserInputError("SOLVER.OPTIMIZER_IMPL fused cannot be combined with SOLVER.CLIP_GRADIENTS and "
                             "SOLVER.AMP.ENABLED: use OPTIMIZER_IMPL foreach")
    if impl:
        kwargs[impl] = True
    if full_model_clip:
        foreach = True if impl else None
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, foreach=foreach)
        return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_cls)(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )
