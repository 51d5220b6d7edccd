"""Move a trained backbone from one detector's checkpoint into another detector's names.

On CPU there is no ImageNet: the ``shapes`` recipes train from scratch. A backbone trained by one
detector (the RetinaNet demo: ``backbone.bottom_up.*`` under an FPN) can initialise another (a query
detector: ``backbone.*``), which is this dataset's analogue of an ImageNet-pretrained backbone.
``tools/extract_backbone.py`` is the CLI.
"""

from __future__ import annotations

import pickle
from typing import Dict

import torch

from ..errors import UserInputError

__all__ = ["read_state_dict", "transfer_backbone"]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The parameter dict of the checkpoint file at ``path`` (Detectron2 ``{"model": ...}``,
    mmdetection ``{"state_dict": ...}`` or a bare state dict).

    Raises:
        UserInputError: the file cannot be read or holds no checkpoint; the message names ``path``.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except EOFError:
        raise UserInputError(f"{path}: cannot read checkpoint (the file is empty or truncated)") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, ValueError) as e:
        raise UserInputError(f"{path}: cannot read checkpoint ({' '.join(str(e).split())})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserInputError(f"{path}: not a checkpoint (expected a dict with 'model' or 'state_dict')")


def transfer_backbone(
    state_dict: Dict[str, torch.Tensor],
    from_prefix: str = "backbone.bottom_up.",
    to_prefix: str = "backbone.",
) -> Dict[str, torch.Tensor]:
    """The tensors under ``from_prefix``, renamed to start with ``to_prefix``; nothing else.

    Raises:
        KeyError: no key starts with ``from_prefix`` (the message lists the top-level prefixes seen).
    """
    out = {to_prefix + k[len(from_prefix) :]: v for k, v in state_dict.items() if k.startswith(from_prefix)}
    if not out:
        seen = sorted({k.split(".")[0] for k in state_dict})
        raise KeyError(f"no key starts with {from_prefix!r}; top-level names: {', '.join(seen)}")
    return out
