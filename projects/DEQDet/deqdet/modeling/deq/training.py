"""``TrainingSchedule``: the losses of DEQDet's training step (the official recipe, ``MODEL.DEQDET``).

With the init stage and the weight-tied refinement stage ``f`` acting on the state
``z = (content (B, N, D), xyzr (B, N, 4))``::

    z0 = init_stage(queries)                          # supervised, plus EXTRA_INIT_SUPERVISIONS
    z = z0.detach()                                   #   supervised applications of f after it
    for i in 1..REFINEMENT_STEPS:
        z_in = RAP(z); z = no_grad f(z_in)
        if i in SUPERVISION_POSITIONS:                # refinement-aware gradient (RAG):
            loss += L(f^RAG(z))                       #   RAG applications of f WITH gradient
                                                      #   (RAG = 0: L(f(z_in)), the one-step gradient)

RAP hands the step the jittered box corners for its IoF attention bias
(:class:`.perturb.RefinementPerturbation`). With ``GRAD_STASH`` each segment (the init stage, its
supervised applications of f, each ``L(f^RAG(z))``) is backpropagated at once through detached
features and queries (:mod:`.stash`).
"""

from typing import Dict, List, Optional, Sequence

import torch

from ..query.decoder import LossFn
from ..query.stage import AdaMixerStage
from .perturb import RefinementPerturbation
from .stash import GradientStash, ObservedLossScale

__all__ = ["TrainingSchedule"]


def _renamed(losses: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``s{i}_loss_x`` (SetCriterion's names for the i-th prediction) -> ``{prefixes[i]}_loss_x``."""
    out = {}
    for name, value in losses.items():
        index, rest = name.split("_", 1)
        out[f"{prefixes[int(index[1:])]}_{rest}"] = value
    return out


class TrainingSchedule:
    """The training losses of an init stage and a refinement stage (module docstring).

    Holds the two stages (the decoder's submodules, not its own) and the loss scale the gradient stash
    observed in the previous backward (:attr:`loss_scale`).

    Args:
        init_stage, refine_stage: the decoder's stages.
        refinement_steps: no-grad applications of the refinement stage per iteration.
        supervision_positions: after which no-grad steps a supervised segment starts (1..refinement_steps).
        rag: applications of f with gradient per segment (0: the one-step gradient).
        extra_init_supervisions: supervised applications of f after the init stage.
        perturbation: RAP before each no-grad step (None: none).
        grad_stash: backpropagate each segment in the forward (:mod:`.stash`).
    """

    def __init__(
        self,
        init_stage: AdaMixerStage,
        refine_stage: AdaMixerStage,
        *,
        refinement_steps: int,
        supervision_positions: Sequence[int],
        rag: int,
        extra_init_supervisions: int,
        perturbation: Optional[RefinementPerturbation],
        grad_stash: bool,
    ):
        positions = sorted(set(int(p) for p in supervision_positions))
        if refinement_steps < 1 or not positions or positions[0] < 1 or positions[-1] > refinement_steps:
            raise ValueError(
                f"MODEL.DEQDET.SUPERVISION_POSITIONS {tuple(supervision_positions)} must be non-empty and "
                f"within 1..REFINEMENT_STEPS ({refinement_steps})"
            )
        if rag < 0 or extra_init_supervisions < 0:
            raise ValueError(f"MODEL.DEQDET.RAG ({rag}) and EXTRA_INIT_SUPERVISIONS "
                             f"({extra_init_supervisions}) must be >= 0")
        self.init_stage, self.refine_stage = init_stage, refine_stage
        self.refinement_steps, self.supervision_positions, self.rag = refinement_steps, positions, rag
        self.extra_init_supervisions = extra_init_supervisions
        self.perturbation = perturbation or RefinementPerturbation(0.0, 0.0, 0.0, 0.0)
        self.grad_stash = grad_stash
        self.loss_scale = ObservedLossScale()

    def _init_losses(self, content, xyzr, features, loss_fn: LossFn, stash: Optional[GradientStash]):
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
        """Training losses (module docstring) of the arguments of :meth:`QueryDecoder.losses`:
        ``init_*``, ``init^{j}_*`` and ``iter{i}_*``. With ``grad_stash`` the values are detached numbers
        except one, which carries all of their gradients (:mod:`.stash`)."""
        stash = None
        if self.grad_stash:
            params = [*self.init_stage.parameters(), *self.refine_stage.parameters()]
            stash = GradientStash(params, [*features, content, xyzr], self.loss_scale)
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
