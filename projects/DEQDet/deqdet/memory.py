"""``SavedTensorMeter``: activation memory of a forward, as bytes of tensors saved for backward.

Device independent (CPU runs measure what a GPU would hold for the same graph)::

    meter = SavedTensorMeter(skip=model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        losses = model(batch)
    meter.peak, meter.current   # bytes at most / still alive (until the backward frees them)
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Bytes of tensors saved for backward alive at once (``current``) and at most (``peak``), one count
    per storage: views and detached leaves that share a storage with an activation (DEQDet's gradient
    stash reads the image features through them) count as that storage. Storages of ``skip`` (the
    parameters) are not counted; subclasses narrow what is counted with :meth:`accepts` and see each
    newly counted storage in :meth:`counted`."""

    def __init__(self, skip: Iterable[torch.Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in skip}
        self.live, self.current, self.peak = {}, 0, 0

    def accepts(self, tensor: torch.Tensor) -> bool:
        return True

    def counted(self, nbytes: int) -> None:
        pass

    def pack(self, tensor: torch.Tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.skip or not self.accepts(tensor):
            return tensor
        entry = self.live.setdefault(key, [tensor.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
            self.counted(entry[0])
        entry[1] += 1
        return _Saved(self, key, tensor)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


class _Saved:
    """A saved tensor; its storage stops counting when autograd drops the last of these."""

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)
