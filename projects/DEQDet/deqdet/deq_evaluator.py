"""``DEQStatisticsEvaluator``: how many refinement steps a DEQ decoder took and how far from a fixed
point it stopped, over a whole evaluation.

Models whose outputs carry ``steps`` (applications of the refinement stage, including the output
one) and ``residuals`` ((MAX_ITERS,) relative residual of each iteration, NaN after the image
stopped) per image, as ``QueryDetector`` with ``DEQDecoder`` does, get their mean and distribution
reported under the task ``deq`` (``deq/mean_steps``, ... in ``metrics.json`` and the log). Other
models' outputs are ignored and nothing is reported.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Dict, List

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["DEQStatisticsEvaluator", "deq_statistics"]

logger = logging.getLogger("detectron2")  # the logger default_setup writes to the console and log.txt

PERCENTILES = (50, 90, 99)


def final_residual(residuals: torch.Tensor) -> float:
    """(MAX_ITERS,) residuals, NaN after the stop -> the last finite one (NaN if there is none)."""
    finite = residuals[torch.isfinite(residuals)]
    return float(finite[-1]) if finite.numel() else float("nan")


def deq_statistics(steps: List[int], residuals: List[float]) -> Dict[str, float]:
    """Per-image steps and final residuals -> ``mean_steps``, ``steps_p50`` / ``p90`` / ``p99``,
    ``min_steps``, ``max_steps``, ``mean_final_residual``, ``final_residual_p50`` / ``p90`` /
    ``p99`` (residual figures over the images that have one)."""
    s = np.asarray(steps, dtype=np.float64)
    out = {"mean_steps": float(s.mean()), "min_steps": float(s.min()), "max_steps": float(s.max())}
    out.update({f"steps_p{p}": float(np.percentile(s, p)) for p in PERCENTILES})
    r = np.asarray(residuals, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size:
        out["mean_final_residual"] = float(r.mean())
        out.update({f"final_residual_p{p}": float(np.percentile(r, p)) for p in PERCENTILES})
    return out


class DEQStatisticsEvaluator(DatasetEvaluator):
    """Collects ``steps`` and the final residual of every image (module docstring); gathered over
    processes, reported by the main process."""

    def reset(self):
        self._steps: List[int] = []
        self._residuals: List[float] = []

    def process(self, inputs, outputs):
        for output in outputs:
            if "steps" not in output:
                continue
            self._steps.append(int(output["steps"]))
            if "residuals" in output:
                self._residuals.append(final_residual(output["residuals"].detach().float().cpu()))

    def evaluate(self):
        steps = list(itertools.chain(*comm.gather(self._steps)))
        residuals = list(itertools.chain(*comm.gather(self._residuals)))
        if not comm.is_main_process() or not steps:
            return {}
        histogram = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(steps).items()))
        logger.info(f"DEQ refinement steps per image over {len(steps)} images (steps: images): {histogram}")
        return {"deq": deq_statistics(steps, residuals)}
