"""Per-image fixed-point solvers for the equilibrium iteration at inference.

Both iterate ``z_{k+1} = f(z_k)`` (or its Anderson-accelerated form) for a batch of flattened states,
each image on its own, and stop an image after ``max_iters`` evaluations of ``f`` or when ``f``
returns a non-finite state for it (the image then keeps its last finite state, with a warning):

- :func:`fixed_steps` (``MODEL.DEQDET.TOL 0``, the official schedule) has no host-device
  synchronisation: every image is evaluated at every step (``f(z, index)`` with all images) and
  stopped images are masked with ``torch.where``; the images that hit a non-finite state are looked
  up once, after the loop, by :func:`warn_non_finite`. tests/modeling/test_cuda_safety.py runs it
  on PyTorch's ``meta`` device, where any host read of a tensor value fails.
- :func:`solve` (``TOL > 0``) also stops an image once its relative residual
  ``||f(z_k) - z_k|| / ||z_k||`` is below ``tol``. That adaptive stop needs host values: each step
  reads the active images (``active.nonzero()``, one synchronisation per step) so that
  ``f(z, index)`` evaluates only those and finished images cost nothing.

The decoder (:class:`~deqdet.modeling.deq.decoder.DEQDecoder`) validates ``SOLVER``, ``TOL`` and
``MAX_ITERS`` when it is built and picks the loop by ``TOL``.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["SOLVERS", "SolverResult", "fixed_steps", "relative_residual", "solve", "warn_non_finite"]

logger = logging.getLogger(__name__)

SOLVERS = ("fixed_point", "anderson")


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


class _AndersonHistory:
    """The last ``window`` pairs (z, f(z)) per image and the least-squares mixing of Anderson
    acceleration (Walker & Ni 2011, with ``beta = 1``): minimise ``||sum_i a_i (f(z_i) - z_i)||`` under
    ``sum_i a_i = 1`` (Tikhonov ``1e-4``) and take ``sum_i a_i f(z_i)``."""

    def __init__(self, batch: int, dim: int, window: int, like: torch.Tensor, reg: float = 1e-4):
        if window < 1:
            raise ValueError(f"MODEL.DEQDET.ANDERSON_WINDOW must be >= 1, got {window}")
        self.window, self.reg, self.count = window, reg, 0
        self.z = like.new_zeros(batch, window, dim)
        self.fz = like.new_zeros(batch, window, dim)

    def step(self, index: torch.Tensor, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        """Record (z, f(z)) of images ``index`` (all active images share one count) -> next iterates."""
        slot = self.count % self.window
        self.z[index, slot], self.fz[index, slot] = z, fz
        self.count += 1
        n = min(self.count, self.window)
        zs, fzs = self.z[index, :n], self.fz[index, :n]
        g = (fzs - zs).double()  # (b, n, d)
        gram = g @ g.transpose(1, 2)
        # Regularisation relative to the residuals' size, so it does not swamp small residuals.
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None]
        gram = gram + self.reg * scale * torch.eye(n, dtype=g.dtype, device=g.device)
        # Bordered system [[0, 1^T], [1, G G^T + reg I]] [mu, a] = [1, 0].
        h = g.new_zeros(len(index), n + 1, n + 1)
        h[:, 0, 1:], h[:, 1:, 0], h[:, 1:, 1:] = 1.0, 1.0, gram
        rhs = g.new_zeros(len(index), n + 1, 1)
        rhs[:, 0] = 1.0
        # solve_ex: no singularity check, so no host synchronisation (the system is regularised).
        alpha = torch.linalg.solve_ex(h, rhs)[0][:, 1:, 0].to(fzs.dtype)  # (b, n)
        mixed = (alpha[:, :, None] * fzs).sum(1)
        return torch.where(torch.isfinite(mixed), mixed, fz)


def _start(z0: torch.Tensor, max_iters: int, method: str, anderson_window: int):
    """The solvers' bookkeeping for states ``z0`` (B, d): residuals (B, max_iters) NaN, iterations (B,)
    0, active (B,) True, and the Anderson history (None for plain fixed-point iteration)."""
    batch = z0.shape[0]
    residuals = z0.new_full((batch, max_iters), float("nan"))
    iterations = torch.zeros(batch, dtype=torch.long, device=z0.device)
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    history = _AndersonHistory(batch, z0.shape[1], anderson_window, z0) if method == "anderson" else None
    return residuals, iterations, active, history


@torch.no_grad()
def solve(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
    method: str = "fixed_point",
    anderson_window: int = 5,
    eps: float = 1e-12,
) -> SolverResult:
    """Iterate ``f`` from ``z0`` (B, d) per image until each image's residual is below ``tol`` (> 0),
    with a host synchronisation per step; see the module docstring."""
    z = z0.clone()
    residuals, iterations, active, history = _start(z0, max_iters, method, anderson_window)
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
        fz = torch.where(finite[:, None], fz, current)
        nxt = fz if history is None else history.step(index, current, fz)
        z[index[finite]] = nxt[finite]
        active[index[finite & (residual < tol)]] = False
    return SolverResult(z, residuals, iterations)


@torch.no_grad()
def fixed_steps(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iters: int,
    method: str = "fixed_point",
    anderson_window: int = 5,
    eps: float = 1e-12,
) -> SolverResult:
    """The ``TOL 0`` loop (``max_iters`` evaluations of ``f`` on every image), without host-device
    synchronisation (module docstring), so a CUDA graph can record it; images whose
    ``f`` turned non-finite stop (fewer ``iterations``, see :func:`warn_non_finite`)."""
    z = z0
    residuals, iterations, active, history = _start(z0, max_iters, method, anderson_window)
    index = torch.arange(z0.shape[0], device=z0.device)
    for k in range(max_iters):
        fz = f(z, index)
        iterations += active.long()
        finite = torch.isfinite(fz).all(dim=1)
        residual = relative_residual(fz, z, eps)
        keep = active & finite
        residuals[:, k] = torch.where(keep, residual, residuals[:, k])
        fz = torch.where(finite[:, None], fz, z)
        nxt = fz if history is None else history.step(index, z, fz)
        z = torch.where(keep[:, None], nxt, z)
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
