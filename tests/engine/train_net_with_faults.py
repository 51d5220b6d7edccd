"""``train_net.py`` with injected faults, for the crash and multi-process tests (run as a script).

Environment:
    FAULT_KILL_AFTER_ITER=k    SIGKILL this process after iteration k (its hooks, checkpoint included).
    FAULT_KILL_SAVING=name     while a checkpoint whose file name contains ``name`` is written, write
                               half of it, then SIGKILL this process.
    FAULT_FIXED_SIZE_DATA=dir  register ``shapes_fixed_size`` (see tests.helpers) from ``dir``.
Module-level code, so that the processes that ``--num-gpus`` spawns run it too. Started with
``tests.helpers.subprocess_env()``, which puts this checkout's ``train_net``, ``tests`` and ``deqdet``
on the path.
"""

import io
import os
import signal
import sys

import torch
from detectron2.engine import HookBase

import train_net
from deqdet.engine import Trainer
from tests.helpers import register_fixed_size_dataset


class _KillAfter(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


if "FAULT_KILL_AFTER_ITER" in os.environ:
    _build_hooks = Trainer.build_hooks
    _kill_after = _KillAfter(int(os.environ["FAULT_KILL_AFTER_ITER"]))
    Trainer.build_hooks = lambda self: _build_hooks(self) + [_kill_after]

if "FAULT_KILL_SAVING" in os.environ:
    _save = torch.save

    def _save_then_die(obj, f, *args, **kwargs):
        if os.environ["FAULT_KILL_SAVING"] not in getattr(f, "name", str(f)):
            return _save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = _save_then_die

if "FAULT_FIXED_SIZE_DATA" in os.environ:
    register_fixed_size_dataset(os.environ["FAULT_FIXED_SIZE_DATA"])

if __name__ == "__main__":
    train_net.cli(sys.argv[1:])
