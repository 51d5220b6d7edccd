"""Per-image fixed-point solvers for the equilibrium iteration at inference.

Both iterate ``z_{k+1} = f(z_k)`` for a batch of flattened states, each image on its own, and stop
an image after ``max_iters`` evaluations of ``f`` or when ``f`` returns a non-finite state for it (the
image then keeps its last finite state, with a warning):

- :func:`fixed_steps` (``MODEL.DEQDET.TOL 0``, the official schedule) has no host-device
  synchronisation: every image is evaluated at every step (``f(z, index)`` with all images) and
  stopped images are masked with ``torch.where``; the images that hit a non-finite state are looked
  up once, after the loop, by :func:`warn_non_finite`. tests/modeling/test_cuda_safety.py runs it
  on PyTorch's ``meta`` device, where any host read of a tensor value fails.
- :func:`solve` (``TOL > 0``) also stops an image once its relative residual
  ``||f(z_k) - z_k|| / ||z_k||`` is below ``tol``. That adaptive stop needs host values: each step
  reads the active images (``active.nonzero()``, one synchronisation per step) so that
  ``f(z, index)`` evaluates only those and finished images cost nothing.

The decoder's inference (:class:`~deqdet.modeling.deq.inference.InferenceSolver`) validates ``TOL``
and ``MAX_ITERS`` when it is built and picks the loop by ``TOL``.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["SolverResult", "fixed_steps", "relative_residual", "solve", "warn_non_finite"]

logger = logging.getLogger(__name__)


def relative_residual(fz: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, d) states ``z`` and ``f(z)`` -> (B,) ``||f(z) - z|| / ||z||`` (the stopping criterion)."""
    return (fz - z).norm(dim=1) / z.norm(dim=1).clamp(min=eps)


@dataclass
class SolverResult:
    """state (B, d): the last iterate; residuals (B, max_iters): relative residual of each evaluation
    of ``f`` (NaN after the image stopped or where ``f`` was not finite); iterations (B,) int64:
    evaluations of ``f`` spent on the image."""

    state: torch.Tensor
    residuals: torch.Tensor
    iterations: torch.Tensor


def _start(z0: torch.Tensor, max_iters: int):
    """The solvers' bookkeeping for states ``z0`` (B, d): residuals (B, max_iters) NaN, iterations (B,)
    0 and active (B,) True."""
    batch = z0.shape[0]
    residuals = z0.new_full((batch, max_iters), float("nan"))
    iterations = torch.zeros(batch, dtype=torch.long, device=z0.device)
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    return residuals, iterations, active


@torch.no_grad()
def solve(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
    eps: float = 1e-12,
) -> SolverResult:
    """Iterate ``f`` from ``z0`` (B, d) per image until each image's residual is below ``tol`` (> 0),
    with a host synchronisation per step; see the module docstring."""
    z = z0.clone()
    residuals, iterations, active = _start(z0, max_iters)
    for k in range(max_iters):
        index = active.nonzero().flatten()
        if index.numel() == 0:
            break
        current = z[index]
        fz = f(current, index)
        iterations[index] += 1
        finite = torch.isfinite(fz).all(dim=1)
        if not finite.all():
            bad = index[~finite].tolist()
            logger.warning(f"DEQ iteration {k + 1}: non-finite state for images {bad}; they keep their last "
                           "finite state")
            active[index[~finite]] = False
        residual = relative_residual(fz, current, eps)
        residuals[index[finite], k] = residual[finite]
        z[index[finite]] = fz[finite]
        active[index[finite & (residual < tol)]] = False
    return SolverResult(z, residuals, iterations)


@torch.no_grad()
def fixed_steps(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iters: int,
    eps: float = 1e-12,
) -> SolverResult:
    """The ``TOL 0`` loop (``max_iters`` evaluations of ``f`` on every image), without host-device
    synchronisation (module docstring), so a CUDA graph can record it; images whose
    ``f`` turned non-finite stop (fewer ``iterations``, see :func:`warn_non_finite`)."""
    z = z0
    residuals, iterations, active = _start(z0, max_iters)
    index = torch.arange(z0.shape[0], device=z0.device)
    for k in range(max_iters):
        fz = f(z, index)
        iterations += active.long()
        finite = torch.isfinite(fz).all(dim=1)
        residual = relative_residual(fz, z, eps)
        keep = active & finite
        residuals[:, k] = torch.where(keep, residual, residuals[:, k])
        z = torch.where(keep[:, None], fz, z)
        active = keep
    return SolverResult(z, residuals, iterations)


def warn_non_finite(iterations: torch.Tensor, max_iters: int) -> None:
    """Log the images of a :func:`fixed_steps` run (``iterations`` (B,)) whose state turned non-finite:
    the one host read of the ``tol = 0`` schedule, after the loop."""
    stopped = iterations < max_iters
    if stopped.any():
        images = stopped.nonzero().flatten().tolist()
        logger.warning(f"DEQ iteration: non-finite state for images {images}; they keep their last finite "
                       "state")
