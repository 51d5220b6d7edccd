"""``DEQDecoder``: DEQDet's equilibrium decoder (Wang, Teng, Wang, ICCV 2023).

An init stage with its own weights, then ONE weight-tied refinement stage ``f`` applied repeatedly
to the state ``z = (content (B, N, D), xyzr (B, N, 4))``. The decoder owns the two stages; its
training losses are :class:`.training.TrainingSchedule`'s (RAP, RAG, the gradient stash) and its
answer is :class:`.inference.InferenceSolver`'s (fixed steps or the adaptive stop at ``TOL``,
``COMPILE``, ``CUDA_GRAPH``, ``TEST_OUTPUT``, the non-finite fallback), both set by ``MODEL.DEQDET``.
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable

from ..query.decoder import QUERY_DECODER_REGISTRY, LossFn, QueryDecoder, stage_kwargs_from_config
from ..query.stage import AdaMixerStage
from .inference import InferenceSolver
from .perturb import RefinementPerturbation
from .training import TrainingSchedule

__all__ = ["DEQDecoder"]


@QUERY_DECODER_REGISTRY.register()
class DEQDecoder(QueryDecoder):
    """Init stage + one weight-tied refinement stage iterated towards a fixed point (module docstring).

    Training: :meth:`losses` (:attr:`schedule`); inference: :meth:`predict` (= :meth:`forward`'s one
    prediction, :attr:`inference`). Parameter names follow the official release: ``init_stage`` is its
    ``roi_head.bbox_head.0``, ``refine_stage`` its ``roi_head.bbox_head.1``.
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
        perturbation: Optional[RefinementPerturbation] = None,
        grad_stash: bool = True,
        tol: float = 0.0,
        max_iters: int = 20,
        compile_stage: bool = False,
        cuda_graph: bool = False,
        test_output: str = "refined",
    ):
        super().__init__()
        self.init_stage = AdaMixerStage(**stage_kwargs)
        self.refine_stage = AdaMixerStage(**stage_kwargs)
        # Plain objects over the two stages: neither is a submodule nor in the state_dict.
        self.schedule = TrainingSchedule(
            self.init_stage, self.refine_stage, refinement_steps=refinement_steps,
            supervision_positions=supervision_positions, rag=rag,
            extra_init_supervisions=extra_init_supervisions, perturbation=perturbation, grad_stash=grad_stash,
        )
        self.inference = InferenceSolver(
            self.init_stage, self.refine_stage, tol=tol, max_iters=max_iters, compile_stage=compile_stage,
            cuda_graph=cuda_graph, test_output=test_output,
        )

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
                d.PERTURB_POSITION_INTENSITY,
            ),
            "grad_stash": d.GRAD_STASH,
            "tol": d.TOL,
            "max_iters": d.MAX_ITERS,
            "compile_stage": d.COMPILE,
            "cuda_graph": d.CUDA_GRAPH,
            "test_output": d.TEST_OUTPUT,
        }

    def get_loss_scale(self) -> float:
        """The loss scale of the trainer's last backward through the gradient stash (1, or the
        ``GradScaler``'s scale under AMP; 1.0 before the first): the next training step backpropagates
        its segments at it. The trainer checkpoints it (``deqdet.engine.LossScaleObserver``)."""
        return self.schedule.loss_scale.value

    def set_loss_scale(self, scale: float) -> None:
        """Take ``scale`` as the last observed loss scale (the trainer, resuming from a checkpoint)."""
        self.schedule.loss_scale.value = scale

    def losses(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor], loss_fn: LossFn
    ) -> Dict[str, torch.Tensor]:
        """Training losses: ``init_*``, ``init^{j}_*`` and ``iter{i}_*``, as
        :meth:`.training.TrainingSchedule.losses` computes them."""
        return self.schedule.losses(content, xyzr, features, loss_fn)

    def trace(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor], num_steps: int
    ) -> List[Dict[str, torch.Tensor]]:
        """The prediction after the init stage and after each of ``num_steps`` plain applications of
        the refinement stage, with each step's relative residual (:meth:`.inference.InferenceSolver.trace`).

        Args:
            content (B, N, D), xyzr (B, N, 4): the initial queries; features: L x (B, C, H_l, W_l).

        Returns:
            ``num_steps + 1`` dicts ``{"logits": (B, N, K), "boxes": (B, N, 4) xyxy[, "quality":
            (B, N, 1)], "residual": (B,)}`` (entry 0: the init stage, residual NaN).
        """
        return self.inference.trace(content, xyzr, features, num_steps)

    def forward(
        self, content: torch.Tensor, xyzr: torch.Tensor, features: List[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """Inference. content (B, N, D), xyzr (B, N, 4), features L x (B, C, H_l, W_l) ->
        ``[{"logits": (B, N, K), "boxes": (B, N, 4) xyxy[, "quality": (B, N, 1)], "residuals": (B,
        MAX_ITERS) (NaN after the image stopped), "steps": (B,) applications of f including the output
        one}]`` (:meth:`.inference.InferenceSolver.__call__`)."""
        return [self.inference(content, xyzr, features)]
