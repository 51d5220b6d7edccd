"""Environment report: ``python -m deqdet.env``. ``train_net.py`` logs it at start."""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["collect_env"]


def _detectron2_origin(d2_dir: str) -> str:
    marker = os.path.join(d2_dir, "DEQDET_ORIGIN.txt")
    if os.path.isfile(marker):
        with open(marker) as f:
            return f.read().strip()
    return "unknown (not installed by tools/setup_env.py)"


def _has_d2_compiled_ops() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def collect_env() -> str:
    """A multi-line, human-readable description of the software and devices in use."""
    import detectron2
    import numpy
    import torch
    import torchvision

    from .evaluation import coco_eval_backend

    lines = [
        f"deqdet: {os.path.dirname(os.path.abspath(__file__))}",
        f"python: {sys.version.split()[0]} ({platform.platform()}) at {sys.executable}",
        f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"torchvision: {torchvision.__version__}",
        f"detectron2: {detectron2.__version__} at {os.path.dirname(detectron2.__file__)}",
        f"detectron2 origin: {_detectron2_origin(os.path.dirname(detectron2.__file__))}",
        f"detectron2 compiled ops (_C): {'yes' if _has_d2_compiled_ops() else 'no'}",
        f"COCO evaluation backend: {coco_eval_backend()}",
        f"numpy: {numpy.__version__}",
        f"CPU threads: {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("CUDA devices: none")
    return "\n".join(lines)


if __name__ == "__main__":
    from .evaluation import install_fast_coco_eval

    install_fast_coco_eval()  # report the backend that training and evaluation use
    print(collect_env())
