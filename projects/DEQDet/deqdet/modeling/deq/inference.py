"""``InferenceSolver``: DEQDet's answer at test time, from the init stage and the refinement stage ``f``.

The init stage, then :func:`.solver.solve` for at most ``MAX_ITERS`` iterations of ``f`` (per image,
until the relative residual is below ``TOL``), then one more application of ``f`` whose prediction is
the output (``TOL = 0``: :func:`.solver.fixed_steps`, the official 20 + 1 steps). With ``COMPILE`` these
applications of ``f`` run through ``torch.compile``; with ``CUDA_GRAPH`` (``TOL = 0``, CUDA inputs) the
init stage and the 20 + 1 steps are replayed from a CUDA graph (:mod:`.graphs`). An image whose output
is not finite gets the init stage's prediction (:func:`_finite_prediction`). ``TEST_OUTPUT`` "init"
answers with the init stage's prediction alone.
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..constants import device_constant
from ..query.stage import AdaMixerStage, StageOutput
from .graphs import CUDAGraphCache
from .solver import fixed_steps, relative_residual, solve, warn_non_finite

__all__ = ["InferenceSolver", "StateCodec", "TEST_OUTPUTS"]

TEST_OUTPUTS = ("refined", "init")

logger = logging.getLogger(__name__)


class StateCodec:
    """State ``(content (B, N, D), xyzr (B, N, 4))`` <-> flat ``(B, N * (D + 4))`` for the solver.

    In the flat form ``x, y`` are divided by the padded input width / height, so the residual weighs
    box centres in image fractions (pixels would dominate the content otherwise); ``z, r`` (log2
    units) and the content enter as they are.
    """

    def __init__(self, num_queries: int, content_dim: int, padded_hw: Tuple[int, int], like: torch.Tensor):
        self.num_queries, self.content_dim = num_queries, content_dim
        h, w = padded_hw
        self.scale = device_constant([w, h, 1.0, 1.0], like)

    def flatten(self, content: torch.Tensor, xyzr: torch.Tensor) -> torch.Tensor:
        return torch.cat([content, xyzr / self.scale], dim=-1).flatten(1)

    def unflatten(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = z.view(z.shape[0], self.num_queries, self.content_dim + 4)
        return z[..., : self.content_dim], z[..., self.content_dim:] * self.scale


class InferenceSolver:
    """The inference of an init stage and a refinement stage (module docstring).

    Holds the two stages (the decoder's submodules, not its own) and what inference makes on first use:
    the compiled stage (:attr:`compiled_stage`) and the CUDA graphs (:attr:`graph_cache`).

    Args:
        init_stage, refine_stage: the decoder's stages.
        tol: stop an image's iterations once its relative residual is below it (0: never).
        max_iters: iterations of f at most, before the output application.
        compile_stage: run the inference applications of f through ``torch.compile``.
        cuda_graph: record and replay the inference on CUDA inputs as CUDA graphs (needs ``tol`` 0).
        test_output: "refined" (the output application's prediction) or "init" (the init stage's).
    """

    def __init__(
        self,
        init_stage: AdaMixerStage,
        refine_stage: AdaMixerStage,
        *,
        tol: float,
        max_iters: int,
        compile_stage: bool,
        cuda_graph: bool,
        test_output: str,
    ):
        if tol < 0 or max_iters < 0:
            raise ValueError(f"MODEL.DEQDET.TOL ({tol}) and MAX_ITERS ({max_iters}) must be >= 0")
        if test_output not in TEST_OUTPUTS:
            raise ValueError(f"MODEL.DEQDET.TEST_OUTPUT must be one of {TEST_OUTPUTS}, got {test_output!r}")
        if cuda_graph and tol > 0:
            raise ValueError(f"MODEL.DEQDET.CUDA_GRAPH needs MODEL.DEQDET.TOL 0, got {tol}: the per-image "
                             "early stop reads the residuals on the host at every step, which a CUDA graph "
                             "cannot record")
        self.init_stage, self.refine_stage = init_stage, refine_stage
        self.tol, self.max_iters = tol, max_iters
        self.compile_stage, self.cuda_graph, self.test_output = compile_stage, cuda_graph, test_output
        self._compiled_stage: Optional[Callable] = None
        self._graph_cache: Optional[CUDAGraphCache] = None

    @property
    def compiled_stage(self) -> Optional[Callable]:
        """The ``torch.compile``-d refinement stage that inference runs with ``COMPILE``; None without
        ``COMPILE`` or before the first inference."""
        return self._compiled_stage

    @property
    def graph_cache(self) -> Optional[CUDAGraphCache]:
        """The CUDA graphs that inference replays with ``CUDA_GRAPH`` on CUDA inputs (``graphs``: one
        per input signature recorded); None without ``CUDA_GRAPH`` or before the first CUDA inference."""
        return self._graph_cache

    def stage(self) -> Callable:
        """The refinement stage for inference: ``torch.compile``-d with ``COMPILE`` (shape-generic after
        the first change of shape), else the module itself. Training uses the plain module."""
        if not self.compile_stage:
            return self.refine_stage
        if self._compiled_stage is None:
            self._compiled_stage = torch.compile(self.refine_stage)
        return self._compiled_stage

    def _padded_hw(self, features: Sequence[torch.Tensor]) -> Tuple[int, int]:
        stride = self.init_stage.strides[0]
        return features[0].shape[-2] * stride, features[0].shape[-1] * stride

    def _codec(self, content: torch.Tensor, features: Sequence[torch.Tensor]) -> StateCodec:
        return StateCodec(content.shape[1], content.shape[2], self._padded_hw(features), content)

    @torch.no_grad()
    def trace(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor], num_steps: int
    ) -> List[Dict[str, torch.Tensor]]:
        """The prediction after the init stage and after each of ``num_steps`` plain applications of
        the refinement stage (no RAP, no solver, no early stop), to watch the refinement.

        Args:
            content (B, N, D), xyzr (B, N, 4): the initial queries; features: L x (B, C, H_l, W_l).

        Returns:
            ``num_steps + 1`` dicts; entry ``i`` is the state after ``i`` applications of f (0: the
            init stage): ``{"logits": (B, N, K), "boxes": (B, N, 4) xyxy[, "quality": (B, N, 1)],
            "residual": (B,)}``, the residual being the step's relative residual ``||z_i - z_{i-1}|| /
            ||z_{i-1}||`` in the solver's state space (:class:`StateCodec`; NaN for entry 0).
        """
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        out = self.init_stage(content, xyzr, features)
        codec = self._codec(out.content, features)
        no_residual = out.logits.new_full((len(out.logits),), float("nan"))
        states = [{**out.prediction(), "residual": no_residual}]
        z = codec.flatten(out.content, out.xyzr)
        for _ in range(num_steps):
            out = self.refine_stage(out.content, out.xyzr, features)
            z_next = codec.flatten(out.content, out.xyzr)
            states.append({**out.prediction(), "residual": relative_residual(z_next, z)})
            z = z_next
        return states

    def _refine(
        self, content: torch.Tensor, xyzr: torch.Tensor, *features: torch.Tensor
    ) -> Tuple[torch.Tensor, ...]:
        """The init stage, the iterations and the output step (what ``CUDA_GRAPH`` records) ->
        ``(init_logits, init_boxes, logits, boxes, residuals, iterations)``, see :meth:`__call__`; with
        a quality branch its predicted-IoU logits are appended to the class logits, (B, N, K + 1)."""
        features = list(features)
        init = self.init_stage(content, xyzr, features)
        content, xyzr = init.content, init.xyzr
        codec = self._codec(content, features)
        stage = self.stage()

        def step(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            feats = features if len(index) == len(content) else [f[index] for f in features]
            out = stage(*codec.unflatten(z), feats)
            return codec.flatten(out.content, out.xyzr)

        z0 = codec.flatten(content, xyzr)
        if self.tol == 0:  # warned about after the loop (_refined), outside a CUDA graph
            result = fixed_steps(step, z0, max_iters=self.max_iters)
        else:
            result = solve(step, z0, tol=self.tol, max_iters=self.max_iters)
        out = stage(*codec.unflatten(result.state), features)
        return _scores(init), init.boxes, _scores(out), out.boxes, result.residuals, result.iterations

    def __call__(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """content (B, N, D), xyzr (B, N, 4), features L x (B, C, H_l, W_l) -> ``{"logits": (B, N, K),
        "boxes": (B, N, 4) xyxy[, "quality": (B, N, 1)], "residuals": (B, MAX_ITERS) (NaN after the
        image stopped), "steps": (B,) applications of f including the output one}``. With
        ``test_output`` "init": the init stage's prediction, ``residuals`` (B, 0) and ``steps`` 0."""
        if self.test_output == "init":
            init = self.init_stage(content, xyzr, features)
            logits, boxes = _scores(init), init.boxes
            logits, boxes = _finite_prediction(logits, boxes, logits, boxes, self._padded_hw(features))
            residuals = logits.new_zeros((len(logits), 0))
            steps = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        else:
            logits, boxes, residuals, steps = self._refined(content, xyzr, features)
        scores = {"logits": logits}
        if self.init_stage.fc_quality is not None:
            scores = {"logits": logits[..., :-1], "quality": logits[..., -1:]}
        return {**scores, "boxes": boxes, "residuals": residuals, "steps": steps}

    def _refined(self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]):
        """The refined answer (:meth:`__call__`): logits (B, N, K[ + 1]), boxes (B, N, 4), residuals
        (B, MAX_ITERS), steps (B,), non-finite outputs replaced (:func:`_finite_prediction`)."""
        refine = self._refine
        if self.cuda_graph and content.is_cuda:
            if self._graph_cache is None:
                self._graph_cache = CUDAGraphCache(self._refine)
            refine = self._graph_cache
        init_logits, init_boxes, logits, boxes, residuals, iterations = refine(content, xyzr, *features)
        if self.tol == 0:
            warn_non_finite(iterations, self.max_iters)
        logits, boxes = _finite_prediction(logits, boxes, init_logits, init_boxes, self._padded_hw(features))
        return logits, boxes, residuals, iterations + 1


def _scores(out: StageOutput) -> torch.Tensor:
    """A stage's class logits (B, N, K), with its predicted-IoU logits appended (B, N, K + 1) if any."""
    return out.logits if out.quality is None else torch.cat([out.logits, out.quality], dim=-1)


def _finite_prediction(logits, boxes, init_logits, init_boxes, padded_hw: Tuple[int, int]):
    """Per image: the output step's prediction (logits (B, N, K), boxes (B, N, 4)) if finite, else the
    init stage's if finite, else whole-image boxes (``padded_hw``: the padded input's height and width)
    with the lowest logit (score 0); each fallback is logged. One host synchronisation (after the
    refinement loop)."""

    def bad(lg, bx):
        return ~(torch.isfinite(lg).flatten(1).all(1) & torch.isfinite(bx).flatten(1).all(1))

    bad_output, bad_init = bad(logits, boxes), bad(init_logits, init_boxes)
    if not bad_output.any():
        return logits, boxes
    images = bad_output.nonzero().flatten().tolist()
    logger.warning(f"DEQ output step not finite for images {images}; they get the init stage's prediction")
    logits = torch.where(bad_output[:, None, None], init_logits, logits)
    boxes = torch.where(bad_output[:, None, None], init_boxes, boxes)
    neither = bad_output & bad_init
    if neither.any():
        images = neither.nonzero().flatten().tolist()
        logger.warning(f"DEQ init stage's prediction not finite either for images {images}; "
                       "they get whole-image boxes with score 0")
        whole_image = boxes.new_tensor([0.0, 0.0, padded_hw[1], padded_hw[0]])
        logits = torch.where(neither[:, None, None], torch.finfo(logits.dtype).min, logits)
        boxes = torch.where(neither[:, None, None], whole_image, boxes)
    return logits, boxes
