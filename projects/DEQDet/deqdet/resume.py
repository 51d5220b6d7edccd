"""What makes a training resumable after a crash: atomic checkpoints, a data stream that continues
where the checkpoint left it, and random streams that restart at every checkpoint boundary.

A resumed run (``train_net.py --resume``) loads the last checkpoint named by ``last_checkpoint``
(model, optimizer, scheduler, iteration, the data seed, DEQ loss scales) and then sees the same
batches and makes the same random draws as a run that was never interrupted:

- data order: Detectron2's ``TrainingSampler`` is an infinite seeded stream of indices; the resumed
  sampler skips the ``start_iter x SOLVER.IMS_PER_BATCH`` indices already consumed (skipping, not
  reseeding, so the stream is the uninterrupted one). Exact when each batch takes consecutive
  indices of the stream: ``DATALOADER.NUM_WORKERS`` <= 1 or ``start_iter`` a multiple of it (a
  ``CHECKPOINT_PERIOD`` multiple of ``NUM_WORKERS`` gives that), and no partly filled aspect-ratio
  group (one group, or ``DATALOADER.ASPECT_RATIO_GROUPING False``). Otherwise the same images
  arrive in a slightly different grouping.
- random draws (augmentation in the main process, DEQDet's RAP noise): every process reseeds
  Python, NumPy and torch from ``(seed, iteration, rank)`` at each multiple of
  ``SOLVER.CHECKPOINT_PERIOD``, so both runs draw the same numbers from the resumed iteration on.
  Augmentation inside DataLoader workers (``NUM_WORKERS`` > 0) draws from the workers' own
  streams, which restart with the workers.
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

__all__ = [
    "AtomicCheckpointer",
    "ResumableLoader",
    "ResumableTrainingSampler",
    "ReseedAtCheckpoints",
    "derived_seed",
]

logger = logging.getLogger(__name__)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear complete or not at all.

    ``save("model_0000999")`` writes ``.model_0000999.incomplete.pth``, flushes it to disk and renames
    it to ``model_0000999.pth`` (``os.replace`` is atomic); only then is ``last_checkpoint`` rewritten,
    itself through a temporary file. A kill at any moment leaves ``last_checkpoint`` naming the
    previous complete checkpoint (or the new one) and no partial file under a checkpoint's name.
    """

    _writing_temporary = False

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        temporary = f".{name}.incomplete"
        self._writing_temporary = True
        try:
            super().save(temporary, **kwargs)
        finally:
            self._writing_temporary = False
        final = os.path.join(self.save_dir, f"{name}.pth")
        _replace_durably(os.path.join(self.save_dir, f"{temporary}.pth"), final)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if self._writing_temporary:  # the base class tags the temporary file: not yet
            return
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with open(tag + ".incomplete", "w") as f:
            f.write(last_filename_basename)
        _replace_durably(tag + ".incomplete", tag)


def _replace_durably(src: str, dst: str) -> None:
    """Flush ``src`` to disk, then atomically rename it to ``dst``."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


class ResumableTrainingSampler(TrainingSampler):
    """``TrainingSampler`` (the infinite seeded stream ``shuffle(range(size)) + shuffle(...) + ...``,
    sharded over processes) that starts after the first ``start`` indices of the stream."""

    def __init__(self, size: int, seed: int, start: int = 0, shuffle: bool = True):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = start

    @property
    def seed(self) -> int:
        return self._seed

    def resume(self, seed: int, start: int) -> None:
        """Continue the stream of ``seed`` after its first ``start`` indices (before iterating)."""
        self._seed, self.start = int(seed), start

    def _infinite_indices(self):
        return itertools.islice(super()._infinite_indices(), self.start, None)


class ResumableLoader:
    """A training data loader (an iterable of batches) and its :class:`ResumableTrainingSampler`,
    which can be moved to a resume position until the loader is first iterated."""

    def __init__(self, loader, sampler: ResumableTrainingSampler):
        self.loader, self.sampler = loader, sampler

    def __iter__(self):
        return iter(self.loader)


def derived_seed(seed: int, iteration: int, rank: int) -> int:
    """A 31-bit seed determined by ``(seed, iteration, rank)``."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0] % 2**31)


class ReseedAtCheckpoints(HookBase):
    """Before each iteration that is a multiple of ``period`` (where a resumed run starts), reseed
    Python, NumPy and torch with :func:`derived_seed` of ``(seed(), iteration, rank)``."""

    def __init__(self, period: int, seed):
        self.period, self.seed = period, seed

    def before_step(self):
        if self.trainer.iter % self.period == 0:
            seed_all_rng(derived_seed(self.seed(), self.trainer.iter, comm.get_rank()))
