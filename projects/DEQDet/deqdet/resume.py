"""What makes a training resumable after a crash: atomic checkpoints, a data stream that continues
where the checkpoint left it, random streams that restart at every checkpoint boundary, and the
state that lives outside the model's and optimizer's ``state_dict``.

A resumed run (``train_net.py --resume``) loads the last checkpoint named by ``last_checkpoint``
(model, optimizer, scheduler, iteration, the data seed, DEQ loss scales, EMA loss normalisers) and
then sees the same batches and makes the same random draws as a run that was never interrupted:

- data: :class:`~deqdet.data.stream.BatchStream` makes batch ``i`` (images, grouping and
  augmentation) a function of ``(seed, i)`` alone, whatever ``DATALOADER.NUM_WORKERS`` and
  ``ASPECT_RATIO_GROUPING``;
- random draws in the model (DEQDet's RAP noise): every process reseeds Python, NumPy and torch
  from ``(seed, iteration, rank)`` at each multiple of ``SOLVER.CHECKPOINT_PERIOD``, where a resumed
  run starts;
- TorchScript functions (fvcore's ``sigmoid_focal_loss_jit`` in ATSS's and RetinaNet's losses)
  compute differently on their first calls in a process (profiled, unoptimised) than later
  (optimised graph), so a resumed process would differ from a continuing one in the last bits:
  training runs them unoptimised throughout (:func:`same_graphs_every_call`);
- loss normalisers kept as moving averages in plain attributes (Detectron2's RetinaNet
  ``loss_normalizer``) are saved and restored with the trainer (:func:`loss_normalizers`).

What stays inexact is announced in the log at resume (:func:`inexact_resume_reasons`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from .data.stream import derived_seed

__all__ = [
    "AtomicCheckpointer", "ReseedAtCheckpoints", "inexact_resume_reasons", "loss_normalizers",
    "same_graphs_every_call",
]

logger = logging.getLogger(__name__)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear complete or not at all.

    ``save("model_0000999")`` writes ``.model_0000999.incomplete.pth``, flushes it to disk and renames
    it to ``model_0000999.pth`` (``os.replace`` is atomic); only then is ``last_checkpoint`` rewritten,
    itself through a temporary file. A kill at any moment leaves ``last_checkpoint`` naming the
    previous complete checkpoint (or the new one) and no partial file under a checkpoint's name.
    ``extra_state`` (a dict) is written into every checkpoint too.
    """

    _writing_temporary = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = {}

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        temporary = f".{name}.incomplete"
        self._writing_temporary = True
        try:
            super().save(temporary, **{**self.extra_state, **kwargs})
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


class ReseedAtCheckpoints(HookBase):
    """Before each iteration that is a multiple of ``period`` (where a resumed run starts), reseed
    Python, NumPy and torch with :func:`derived_seed` of ``(seed(), iteration, rank)``."""

    def __init__(self, period: int, seed):
        self.period, self.seed = period, seed

    def before_step(self):
        if self.trainer.iter % self.period == 0:
            seed_all_rng(derived_seed(self.seed(), self.trainer.iter, comm.get_rank()))


@contextlib.contextmanager
def same_graphs_every_call():
    """TorchScript functions run unoptimised inside the block (in this thread), as on their first
    calls: the optimised graph the profiling executor switches to after them computes some
    results in another order (last-bit differences), which a resumed process would not match."""
    with torch.jit.optimized_execution(False):
        yield


def loss_normalizers(model: torch.nn.Module) -> dict[str, float]:
    """``{module name: loss_normalizer}`` of the modules that keep a moving-average loss normaliser
    in a plain attribute (Detectron2's RetinaNet), which the model's ``state_dict`` leaves out."""
    return {name: float(m.loss_normalizer) for name, m in model.named_modules()
            if isinstance(getattr(m, "loss_normalizer", None), (int, float))}


def inexact_resume_reasons(cfg, start_iter: int, stream_resumed: bool) -> list[str]:
    """Why a run resumed at ``start_iter`` may not end with the weights of an uninterrupted run
    (empty when it will, on the CPU)."""
    reasons = []
    if not stream_resumed:
        reasons.append(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN} (or a checkpoint without "
                       "the data seed): the data order starts afresh")
    if start_iter % cfg.SOLVER.CHECKPOINT_PERIOD:
        reasons.append(f"iteration {start_iter} is not a multiple of SOLVER.CHECKPOINT_PERIOD "
                       f"{cfg.SOLVER.CHECKPOINT_PERIOD}: random draws differ until the next multiple")
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        reasons.append("CUDA kernels (atomics, cuDNN algorithm choice) are not deterministic: the weights "
                       "agree with an uninterrupted run's up to that run-to-run noise")
    return reasons
