"""The training data stream as a pure function of ``(seed, batch number)``, so that a resumed run
sees exactly the batches, augmentations included, of a run that was never interrupted.

Detectron2's training loader groups images by aspect ratio as they come out of the DataLoader
workers and augments them with each worker's own random stream; both depend on where the workers
stood when the run was stopped. Here:

- the batches are formed from the indices alone: Detectron2's ``TrainingSampler`` stream (infinite,
  seeded, sharded over processes), with aspect-ratio grouping on the records' ``width`` /
  ``height`` (Detectron2's two groups: wider than high, or not) before any image is read;
- each batch is mapped whole by one DataLoader worker, the workers taking the batches in turn (as
  the DataLoader asks them in turn, the batches arrive in order), each image with Python, NumPy and
  torch reseeded from ``(seed, position of the image in the stream of all processes)`` and
  restored afterwards: an image is augmented alike whatever the number of workers or processes;
- an image the mapper cannot read is replaced by one drawn from the same seed;
- :meth:`BatchStream.resume` starts at batch ``b`` by replaying the index stream (cheap: no image
  is read) and skipping the first ``b`` batches.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["BatchStream", "build_stream_loader", "derived_seed", "seeded_random_streams"]

_MAX_REPLACEMENTS = 100  # unreadable images replaced in a row before giving up


def derived_seed(*keys: int) -> int:
    """A 31-bit seed determined by the integers ``keys`` (e.g. ``seed, iteration, rank``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] % 2**31)


@contextlib.contextmanager
def seeded_random_streams(seed: int):
    """Python's, NumPy's and torch's (CPU) global random streams seeded with ``seed`` inside the
    block, and as they were before it afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_all_rng(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _group(record: dict) -> int:
    """Detectron2's aspect-ratio group: 0 for an image wider than high, else 1."""
    return 0 if record.get("width", 1) > record.get("height", 0) else 1


class BatchStream(IterableDataset):
    """The infinite stream of mapped training batches of this process (lists of ``batch_size``
    mapper outputs), the same whatever the number of DataLoader workers and wherever it resumes."""

    def __init__(
        self, dataset: List[dict], mapper: Callable[[dict], dict | None], *, batch_size: int, seed: int,
        aspect_ratio_grouping: bool = True, shuffle: bool = True,
    ):
        self.dataset, self.mapper, self.batch_size = dataset, mapper, batch_size
        self.aspect_ratio_grouping, self.shuffle = aspect_ratio_grouping, shuffle
        self.seed, self.start = int(seed), 0
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def resume(self, seed: int, start: int) -> None:
        """Continue the stream of ``seed`` at batch ``start`` (before iterating)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.seed, self.start = int(seed), int(start)

    def index_batches(self) -> Iterator[List[Tuple[int, int]]]:
        """From batch 0 on: per batch, ``(position in the stream of all processes, dataset index)``
        of each of this process's images."""
        # this process's share of the stream: positions rank, rank + world size, ...
        sampler = TrainingSampler(len(self.dataset), shuffle=self.shuffle, seed=self.seed)
        indices = ((n * self.world_size + self.rank, index) for n, index in enumerate(sampler))
        if not self.aspect_ratio_grouping:
            while True:
                yield [next(indices) for _ in range(self.batch_size)]
        buckets = ([], [])
        for position, index in indices:
            bucket = buckets[_group(self.dataset[index])]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def _map(self, position: int, index: int) -> dict:
        """Image ``index`` at ``position`` of the stream, mapped; an image the mapper skips (it
        cannot be read) is replaced by another one drawn from the same seed."""
        for attempt in range(_MAX_REPLACEMENTS):
            with seeded_random_streams(derived_seed(self.seed, position)):
                mapped = self.mapper(self.dataset[index])
            if mapped is not None:
                return mapped
            index = int(np.random.default_rng([self.seed, position, attempt]).integers(len(self.dataset)))
        raise RuntimeError(f"{_MAX_REPLACEMENTS} training images in a row could not be read (see the log)")

    def __iter__(self) -> Iterator[List[dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for number, batch in enumerate(self.index_batches()):
            if number >= self.start and (number - self.start) % workers == worker:
                yield [self._map(position, index) for position, index in batch]


def _as_is(batch: List[dict]) -> List[dict]:
    return batch


def build_stream_loader(stream: BatchStream, num_workers: int) -> DataLoader:
    """A DataLoader over ``stream`` (one batch per item; the workers take the batches in turn)."""
    generator = torch.Generator().manual_seed(derived_seed(stream.seed, stream.rank))  # not the global stream
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is, generator=generator)
