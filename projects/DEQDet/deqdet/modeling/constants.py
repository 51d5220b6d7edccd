"""``device_constant``: a small constant tensor filled on the device of a tensor, with no host copy."""

from typing import Sequence

import torch

__all__ = ["device_constant"]


def device_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(len(values),) tensor of ``like``'s dtype and device holding ``values``, equal to
    ``like.new_tensor(values)`` but filled on the device: no host-to-device copy, which a CUDA graph
    cannot record (:mod:`deqdet.modeling.deq.graphs`)."""
    return torch.stack([like.new_full((), float(v)) for v in values])
