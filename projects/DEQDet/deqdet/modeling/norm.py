"""Norm layers Detectron2 lacks, usable by name in ``MODEL.RESNETS.NORM`` (see :func:`resolve_norm`).

``"FrozenStatsBN"`` (:class:`FrozenStatsBatchNorm2d`): BatchNorm that always normalises with its running
statistics and never updates them, whatever the module's training flag, while its scale and bias TRAIN.
This is mmdetection's ``norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True``, the backbone
norm of the official AdaMixer and DEQDet recipes. Detectron2's ``FrozenBN`` freezes the scale and bias
too; its ``BN`` updates the statistics in training. The state-dict keys are those of ``FrozenBN``
(``weight``, ``bias``, ``running_mean``, ``running_var``; no ``num_batches_tracked``), so the same
checkpoints and converted official weights load into either.

Detectron2's ``get_norm`` maps names through a fixed table (a config may not hold a class). The
project's ResNet builders (:mod:`.backbone`) accept the names of :data:`PROJECT_NORMS` in
``MODEL.RESNETS.NORM``: the narrow ResNets pass the class to ``get_norm`` (:func:`resolve_norm`);
``build_resnet_backbone_project_norm`` builds Detectron2's ResNet with ``BN``, converts every
BatchNorm layer (:meth:`FrozenStatsBatchNorm2d.convert`, as Detectron2 converts frozen stages into
``FrozenBN``) and then freezes the stages up to ``FREEZE_AT``.

Detectron2's ``WEIGHT_DECAY_NORM`` reaches these norms through :mod:`deqdet.optim`.
"""

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenStatsBatchNorm2d", "PROJECT_NORMS", "resolve_norm"]


class FrozenStatsBatchNorm2d(nn.Module):
    """(N, C, H, W) -> (N, C, H, W): ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``weight`` and ``bias`` are parameters (trainable unless frozen by the backbone's ``FREEZE_AT``);
    ``running_mean`` and ``running_var`` are buffers that no forward changes.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    @torch.no_grad()
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm2d`` in it (itself included) replaced by this norm,
        keeping its affine parameters and running statistics."""
        if isinstance(module, nn.BatchNorm2d):
            converted = cls(module.num_features, module.eps)
            if module.affine:
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
            converted.running_mean.copy_(module.running_mean)
            converted.running_var.copy_(module.running_var)
            return converted
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


# Norm names this project adds to Detectron2's (``get_norm``'s "BN", "FrozenBN", "GN", "SyncBN", ...).
PROJECT_NORMS = {"FrozenStatsBN": FrozenStatsBatchNorm2d}


def resolve_norm(name: str) -> Union[str, Callable[[int], nn.Module]]:
    """A ``MODEL.RESNETS.NORM`` value -> what Detectron2's ``get_norm`` accepts: the project's norm
    class for a name in :data:`PROJECT_NORMS`, else the name itself (one of Detectron2's)."""
    return PROJECT_NORMS.get(name, name)
