"""Converters from the official released checkpoints to this project's parameter names.

``convert_official(state_dict, source)`` dispatches to the converter registered for ``source``
(``"dyhead"``, ``"adamixer"``, ``"deqdet"``). Each converter returns a :class:`Conversion`: the
converted state dict plus the official keys it dropped on purpose (tensors the official forward
never uses), so nothing is ever dropped silently. ``tools/convert_official.py`` is the CLI.
``transfer_backbone`` moves a trained backbone between detectors (``tools/extract_backbone.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = [
    "Conversion",
    "register_converter",
    "convert_official",
    "available_sources",
    "convert_by_renaming",
    "transfer_backbone",
    "read_state_dict",
]


@dataclass
class Conversion:
    """Result of a conversion.

    Attributes:
        state_dict: our parameter name -> tensor.
        dropped: official keys deliberately left out (unused by the official forward), sorted.
    """

    state_dict: Dict[str, torch.Tensor]
    dropped: List[str] = field(default_factory=list)


def convert_by_renaming(
    state_dict: Dict[str, torch.Tensor],
    rename: Callable[[str], Optional[str]],
    unused: Callable[[str], bool],
    source: str,
) -> Conversion:
    """Rename every key with ``rename`` (None: unknown), dropping those for which ``unused`` holds.

    Raises:
        KeyError: a key that is neither unused nor known, named in the message.
    """
    converted, dropped = {}, []
    for name, tensor in state_dict.items():
        if unused(name):
            dropped.append(name)
            continue
        ours = rename(name)
        if ours is None:
            raise KeyError(f"official {source} key {name!r} is not known to the converter")
        converted[ours] = tensor
    return Conversion(converted, sorted(dropped))


_CONVERTERS: Dict[str, Callable[[Dict[str, torch.Tensor]], Conversion]] = {}


def register_converter(source: str):
    """Decorator registering ``fn(state_dict) -> Conversion`` under the name ``source``."""

    def deco(fn):
        if source in _CONVERTERS:
            raise KeyError(f"a converter for {source!r} is already registered")
        _CONVERTERS[source] = fn
        return fn

    return deco


def available_sources() -> List[str]:
    return sorted(_CONVERTERS)


def convert_official(state_dict: Dict[str, torch.Tensor], source: str) -> Conversion:
    """Convert an official checkpoint's ``state_dict`` (already unwrapped from ``{"model": ...}``
    or ``{"state_dict": ...}``) of the given ``source`` to our names.

    Raises:
        KeyError: unknown ``source``, or (from the converter) an official key it does not know or a
            key its forward needs that the checkpoint lacks; the message names the key.
    """
    if source not in _CONVERTERS:
        raise KeyError(f"unknown checkpoint source {source!r}; known: {', '.join(available_sources())}")
    return _CONVERTERS[source](dict(state_dict))


# Each converter module registers itself ("adamixer", "deqdet", "dyhead") in _CONVERTERS.
from . import adamixer, deqdet, dyhead  # noqa: E402,F401
from .transfer import read_state_dict, transfer_backbone  # noqa: E402
