"""``DEQDecoder``: DEQDet's equilibrium decoder (Wang, Teng, Wang, ICCV 2023).

An init stage with its own weights, then ONE weight-tied refinement stage ``f`` applied repeatedly
to the state ``z = (content (B, N, D), xyzr (B, N, 4))``.

Training (:meth:`DEQDecoder.losses`, the official recipe; all of it under ``MODEL.DEQDET``)::

    z0 = init_stage(queries)                          # supervised, plus EXTRA_INIT_SUPERVISIONS
    z = z0.detach()                                   #   supervised applications of f after it
    for i in 1..REFINEMENT_STEPS:
        z_in = RAP(z); z = no_grad f(z_in)
        if i in SUPERVISION_POSITIONS:                # refinement-aware gradient (RAG):
            loss += L(f^RAG(z))                       #   RAG applications of f WITH gradient
                                                      #   (RAG = 0: L(f(z_in)), the one-step gradient)

RAP hands the step the jittered box corners for its IoF attention bias
(:class:`.perturb.RefinementPerturbation`). With ``GRAD_STASH`` each segment (the
init stage, its supervised applications of f, each ``L(f^RAG(z))``) is backpropagated at once through
detached features and queries (:mod:`.stash`).
Inference (:meth:`DEQDecoder.forward`): the init stage, then :func:`.solver.solve` for at most
``MAX_ITERS`` iterations (per image, until the relative residual is below ``TOL``), then one more
application of ``f`` whose prediction is the output (``TOL = 0``: the official 20 + 1 steps); with
``COMPILE`` these applications of ``f`` run through ``torch.compile``; with ``CUDA_GRAPH`` (``TOL = 0``,
CUDA inputs) the init stage and the 20 + 1 steps are replayed from a CUDA graph (:mod:`.graphs`).
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable

from ..constants import device_constant
from ..query.decoder import QUERY_DECODER_REGISTRY, LossFn, QueryDecoder, stage_kwargs_from_config
from ..query.stage import AdaMixerStage, StageOutput
from .graphs import CUDAGraphCache
from .perturb import RefinementPerturbation
from .solver import fixed_steps, relative_residual, solve, warn_non_finite
from .stash import GradientStash, ObservedLossScale

__all__ = ["DEQDecoder", "StateCodec", "TEST_OUTPUTS"]

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


def _renamed(losses: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``s{i}_loss_x`` (SetCriterion's names for the i-th prediction) -> ``{prefixes[i]}_loss_x``."""
    out = {}
    for name, value in losses.items():
        index, rest = name.split("_", 1)
        out[f"{prefixes[int(index[1:])]}_{rest}"] = value
    return out


@QUERY_DECODER_REGISTRY.register()
class DEQDecoder(QueryDecoder):
    """Init stage + one weight-tied refinement stage iterated towards a fixed point (module docstring).

    Training: :meth:`losses`; inference: :meth:`predict` (= :meth:`forward`'s one prediction).
    Parameter names follow the official release: ``init_stage`` is its ``roi_head.bbox_head.0``,
    ``refine_stage`` its ``roi_head.bbox_head.1``.
    """

    @configurable
    def __init__(
        self,
        *,
        stage_kwargs: dict,
        refinement_steps: int = 20,
        supervision_positions: Sequence[int] = (1, 3, 6, 9, 12, 20),
        rag: int = 2,
        extra_init_supervisions: int = 2,
        perturbation: RefinementPerturbation = None,
        grad_stash: bool = True,
        tol: float = 0.0,
        max_iters: int = 20,
        compile_stage: bool = False,
        cuda_graph: bool = False,
        test_output: str = "refined",
    ):
        super().__init__()
        positions = sorted(set(int(p) for p in supervision_positions))
        if refinement_steps < 1 or not positions or positions[0] < 1 or positions[-1] > refinement_steps:
            raise ValueError(
                f"MODEL.DEQDET.SUPERVISION_POSITIONS {tuple(supervision_positions)} must be non-empty and "
                f"within 1..REFINEMENT_STEPS ({refinement_steps})"
            )
        if rag < 0 or extra_init_supervisions < 0:
            raise ValueError(f"MODEL.DEQDET.RAG ({rag}) and EXTRA_INIT_SUPERVISIONS "
                             f"({extra_init_supervisions}) must be >= 0")
        if tol < 0 or max_iters < 0:
            raise ValueError(f"MODEL.DEQDET.TOL ({tol}) and MAX_ITERS ({max_iters}) must be >= 0")
        if test_output not in TEST_OUTPUTS:
            raise ValueError(f"MODEL.DEQDET.TEST_OUTPUT must be one of {TEST_OUTPUTS}, got {test_output!r}")
        if cuda_graph and tol > 0:
            raise ValueError(f"MODEL.DEQDET.CUDA_GRAPH needs MODEL.DEQDET.TOL 0, got {tol}: the per-image "
                             "early stop reads the residuals on the host at every step, which a CUDA graph "
                             "cannot record")
        self.init_stage = AdaMixerStage(**stage_kwargs)
        self.refine_stage = AdaMixerStage(**stage_kwargs)
        self.refinement_steps, self.supervision_positions, self.rag = refinement_steps, positions, rag
        self.extra_init_supervisions = extra_init_supervisions
        self.perturbation = perturbation or RefinementPerturbation(0.0, 0.0, 0.0, 0.0)
        self.grad_stash = grad_stash
        self.tol, self.max_iters = tol, max_iters
        self.compile_stage = compile_stage
        self.cuda_graph = cuda_graph
        self.test_output = test_output
        # Made on first use (compiled_stage, graph_cache); neither is a submodule nor in the state_dict.
        self._compiled_stage: Optional[Callable] = None
        self._graph_cache: Optional[CUDAGraphCache] = None
        self.loss_scale = ObservedLossScale()

    @classmethod
    def from_config(cls, cfg, strides):
        d = cfg.MODEL.DEQDET
        return {
            "stage_kwargs": stage_kwargs_from_config(cfg, strides),
            "refinement_steps": d.REFINEMENT_STEPS,
            "supervision_positions": d.SUPERVISION_POSITIONS,
            "rag": d.RAG,
            "extra_init_supervisions": d.EXTRA_INIT_SUPERVISIONS,
            "perturbation": RefinementPerturbation(
                d.PERTURB_CONTENT_PROB, d.PERTURB_CONTENT_INTENSITY, d.PERTURB_POSITION_PROB,
                d.PERTURB_POSITION_INTENSITY
            ),
            "grad_stash": d.GRAD_STASH,
            "tol": d.TOL,
            "max_iters": d.MAX_ITERS,
            "compile_stage": d.COMPILE,
            "cuda_graph": d.CUDA_GRAPH,
            "test_output": d.TEST_OUTPUT,
        }

    def _init_losses(self, content, xyzr, features, loss_fn: LossFn, stash):
        """Init stage (+ supervised applications of f) -> (its losses, its detached state). With a
        ``stash`` the applications of f form one segment and the init stage, receiving their gradient
        on its output content, another."""
        init = self.init_stage(content, xyzr, features)
        content = init.content
        start = (content.detach(), init.xyzr.detach())
        init_losses = _renamed(loss_fn([init.prediction()]), ["init"])
        state = (start[0].requires_grad_(), start[1]) if stash else (content, init.xyzr)
        predictions = []
        for _ in range(self.extra_init_supervisions):
            step = self.refine_stage(*state, features)
            state = (step.content, step.xyzr)
            predictions.append(step.prediction())
        extra_losses = {}
        if predictions:
            names = [f"init^{j}" for j in range(1, len(predictions) + 1)]
            extra_losses = _renamed(loss_fn(predictions), names)
        losses = {**init_losses, **extra_losses}
        if stash:
            if extra_losses:
                content_grad = stash.backward(sum(extra_losses.values()), wrt=[start[0]])[0]
                stash.backward(sum(init_losses.values()), outputs=[content], output_grads=[content_grad])
            else:
                stash.backward(sum(init_losses.values()))
            losses = {k: v.detach() for k, v in losses.items()}
            start = (start[0].detach(), start[1])
        return losses, start

    def losses(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor], loss_fn: LossFn
    ) -> Dict[str, torch.Tensor]:
        """Training losses (module docstring).

        Args:
            content (B, N, D), xyzr (B, N, 4): the initial queries; features: L x (B, C, H_l, W_l).
            loss_fn: predictions list -> ``{"s{i}_loss_*": scalar}`` (the criterion with the targets).

        Returns:
            ``init_*``, ``init^{j}_*`` and ``iter{i}_*`` losses. With ``grad_stash`` the values are
            detached numbers except one, which carries all of their gradients (:mod:`.stash`).
        """
        stash = None
        if self.grad_stash:
            stash = GradientStash(self, [*features, content, xyzr], self.loss_scale)
            *features, content, xyzr = stash.leaves
        losses, state = self._init_losses(content, xyzr, features, loss_fn, stash)
        for i in range(1, self.refinement_steps + 1):
            with torch.no_grad():
                content, xyzr, iof_boxes = self.perturbation(*state)
                step = self.refine_stage(content, xyzr, features, iof_boxes=iof_boxes)
                state = (step.content, step.xyzr)
            if i not in self.supervision_positions:
                continue
            if self.rag:  # RAG applications of f with gradient from the no-grad state
                segment = self.refine_stage(*state, features)
                for _ in range(self.rag - 1):
                    segment = self.refine_stage(segment.content, segment.xyzr, features)
            else:  # the one-step gradient: the position's own step again, with gradient
                segment = self.refine_stage(content, xyzr, features, iof_boxes=iof_boxes)
            segment_losses = _renamed(loss_fn([segment.prediction()]), [f"iter{i}"])
            if stash:
                stash.backward(sum(segment_losses.values()))
                segment_losses = {k: v.detach() for k, v in segment_losses.items()}
            losses.update(segment_losses)
        if stash:
            carrier = next(iter(losses))
            losses[carrier] = stash.attach(losses[carrier])
        return losses

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

    def _inference_stage(self) -> Callable:
        """The refinement stage for inference: ``torch.compile``-d with ``COMPILE`` (shape-generic after
        the first change of shape), else the module itself."""
        if not self.compile_stage:
            return self.refine_stage
        if self._compiled_stage is None:
            # set past nn.Module.__setattr__, which would make the compiled module a submodule (and put
            # its parameters a second time in the state_dict)
            object.__setattr__(self, "_compiled_stage", torch.compile(self.refine_stage))
        return self._compiled_stage

    def _refine(
        self, content: torch.Tensor, xyzr: torch.Tensor, *features: torch.Tensor
    ) -> Tuple[torch.Tensor, ...]:
        """The init stage, the iterations and the output step (what ``CUDA_GRAPH`` records) ->
        ``(init_logits, init_boxes, logits, boxes, residuals, iterations)``, see :meth:`forward`; with a
        quality branch its predicted-IoU logits are appended to the class logits, (B, N, K + 1)."""
        features = list(features)
        init = self.init_stage(content, xyzr, features)
        content, xyzr = init.content, init.xyzr
        codec = self._codec(content, features)
        stage = self._inference_stage()

        def step(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            feats = features if len(index) == len(content) else [f[index] for f in features]
            out = stage(*codec.unflatten(z), feats)
            return codec.flatten(out.content, out.xyzr)

        z0 = codec.flatten(content, xyzr)
        if self.tol == 0:  # warned about after the loop (forward), outside a CUDA graph
            result = fixed_steps(step, z0, max_iters=self.max_iters)
        else:
            result = solve(step, z0, tol=self.tol, max_iters=self.max_iters)
        out = stage(*codec.unflatten(result.state), features)
        return _scores(init), init.boxes, _scores(out), out.boxes, result.residuals, result.iterations

    def forward(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """Inference. content (B, N, D), xyzr (B, N, 4), features L x (B, C, H_l, W_l) ->
        ``[{"logits": (B, N, K), "boxes": (B, N, 4) xyxy[, "quality": (B, N, 1)], "residuals": (B,
        MAX_ITERS) (NaN after the image stopped), "steps": (B,) applications of f including the output
        one}]``. With ``test_output`` "init": the init stage's prediction, ``residuals`` (B, 0) and
        ``steps`` 0."""
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
        return [{**scores, "boxes": boxes, "residuals": residuals, "steps": steps}]

    def _refined(self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]):
        """The refined answer (``forward``): logits (B, N, K[ + 1]), boxes (B, N, 4), residuals (B,
        MAX_ITERS), steps (B,), non-finite outputs replaced (:func:`_finite_prediction`)."""
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
