"""``TEST.AUTOCAST``: inference under ``torch.autocast`` (bfloat16 or float16), detections returned in
float32. On CPUs with AVX512-BF16 or AMX and on GPUs this roughly halves the time of the matrix
products and convolutions (the speed suite, `make bench`); boxes and scores move by the rounding of
16-bit arithmetic."""

from __future__ import annotations

from typing import Optional

import torch
from detectron2.structures import Boxes, Instances
from torch import nn

from .errors import UserInputError

__all__ = ["AUTOCAST_DTYPES", "autocast_dtype", "AutocastInference", "with_inference_autocast"]

AUTOCAST_DTYPES = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(cfg) -> Optional[torch.dtype]:
    """The dtype ``TEST.AUTOCAST`` names (None: off). Raises UserInputError naming the key."""
    value = cfg.TEST.AUTOCAST
    if value not in AUTOCAST_DTYPES:
        raise UserInputError(f"TEST.AUTOCAST must be one of {sorted(AUTOCAST_DTYPES)}, got {value!r}")
    return AUTOCAST_DTYPES[value]


def _float32(value):
    """Floating tensors (also inside ``Instances`` and ``Boxes``) as float32; anything else unchanged."""
    if isinstance(value, Instances):
        return Instances(value.image_size, **{k: _float32(v) for k, v in value.get_fields().items()})
    if isinstance(value, Boxes):
        return Boxes(_float32(value.tensor))
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


class AutocastInference(nn.Module):
    """A Detectron2 model called under ``torch.autocast(<its device type>, dtype)``:
    ``list[dict] -> list[dict]``, with the floating fields of the outputs in float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, batched_inputs):
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=self.dtype):
            outputs = self.model(batched_inputs)
        if self.model.training:  # a loss dict: the trainer's business
            return outputs
        return [{k: _float32(v) for k, v in output.items()} for output in outputs]


def with_inference_autocast(model: nn.Module, cfg) -> nn.Module:
    """``model`` wrapped in :class:`AutocastInference` when ``TEST.AUTOCAST`` names a dtype, else itself."""
    dtype = autocast_dtype(cfg)
    return model if dtype is None else AutocastInference(model, dtype)
