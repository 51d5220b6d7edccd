"""``train_net.py`` with injected faults, for the crash and multi-process tests (run as a script).

Environment:
    FAULT_KILL_AFTER_ITER=k    SIGKILL this process after iteration k (its hooks, checkpoint included).
    FAULT_KILL_SAVING=name     while a checkpoint whose file name contains ``name`` is written, write
                               half of it, then SIGKILL this process.
    FAULT_FIXED_SIZE_DATA=dir  register ``shapes_fixed_size`` (see reliability_helpers) from ``dir``.
Module-level code, so that the processes that ``--num-gpus`` spawns run it too.
"""

import io
import os
import signal
import sys

import torch
from detectron2.engine import HookBase

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_net  # noqa: E402
from deqdet.engine import Trainer  # noqa: E402


class _KillAfter(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


if "FAULT_KILL_AFTER_ITER" in os.environ:
    _build_hooks = Trainer.build_hooks
    Trainer.build_hooks = lambda self: _build_hooks(self) + [_KillAfter(int(os.environ["FAULT_KILL_AFTER_ITER"]))]

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
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reliability_helpers import register_fixed_size_dataset

    register_fixed_size_dataset(os.environ["FAULT_FIXED_SIZE_DATA"])

if __name__ == "__main__":
    train_net.cli(sys.argv[1:])
