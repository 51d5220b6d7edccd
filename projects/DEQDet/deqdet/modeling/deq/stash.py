"""Gradient stash: backpropagate a loss segment now, hand its gradients to autograd later.

DEQDet supervises several segments: the init stage, the applications of f after it, and one segment
per supervision position of the refinement. Keeping them all in one graph until the trainer's
backward costs activation memory for every segment. Instead each segment runs on *detached* copies of
the image features and initial queries and is backpropagated at once with ``torch.autograd.grad`` into
a stash (the gradients of the decoder's parameters and of the detached inputs); its graph is freed,
so the decoder's activation memory is that of its largest segment. :meth:`GradientStash.attach` then
wraps one logged loss value in an autograd function that has the same value and, when the trainer's
backward reaches it, returns the stashed gradients as the gradients of the real features and queries
(so they flow on into the neck, the backbone and the query embeddings) and of the decoder's
parameters.

Nothing is written to ``.grad`` during the forward (the official code does, with hooks on the
features; here that would break: Detectron2's trainers call ``zero_grad`` after the forward). DDP's
gradient hooks and AMP's ``GradScaler`` therefore only see the ordinary backward, in which every
trainable parameter receives its gradient once, so Detectron2's DDP settings
(``find_unused_parameters=False``) work unchanged (tests/modeling/deq/test_ddp.py). The
gradient arriving at the wrapped value is the trainer's loss scale (1, or the ``GradScaler`` scale
under AMP); the stash is multiplied by it, so the result equals backpropagating every segment in the
same backward. To keep fp16 gradients of the segments from underflowing, each segment is
backpropagated scaled by the scale observed in the previous iteration (and divided by it again
when returned), which changes nothing numerically beyond rounding.
"""

from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["GradientStash", "ObservedLossScale"]


class ObservedLossScale:
    """The loss scale seen by the last backward through a stash (1.0 before the first one)."""

    def __init__(self):
        self.value = 1.0

    def observe(self, grad: torch.Tensor) -> None:
        value = float(grad)
        if value > 0 and value != float("inf"):
            self.value = value


class _ReturnStashedGradients(torch.autograd.Function):
    """``value`` unchanged forward; backward: ``grad * stash / scale`` for each input tensor."""

    @staticmethod
    def forward(ctx, value, stash, *inputs):
        ctx.stash = stash
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        stash = ctx.stash
        factor = grad / stash.segment_scale
        stash.loss_scale.observe(grad)
        grads = [None if g is None else (g * factor).to(g.dtype) for g in stash.grads]
        return (None, None, *grads)


class GradientStash:
    """Stash of ``d(segment losses) / d(inputs)`` for ``inputs`` = detached copies of the real input
    tensors (image features, initial queries) + the trainable ones of ``params``.

    Args:
        params: the parameters the segments use (the decoder's; those without ``requires_grad`` are
            left out).
        inputs: the real tensors the segments read (feature maps L x (B, C, H_l, W_l), queries);
            :attr:`leaves` are their detached copies, to be used by the segments in their place.
        loss_scale: scale observed in the previous backward (segments are backpropagated with it).
    """

    def __init__(
        self, params: Iterable[nn.Parameter], inputs: Sequence[torch.Tensor], loss_scale: ObservedLossScale
    ):
        self.real_inputs = list(inputs)
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        self.params = [p for p in params if p.requires_grad]
        self.loss_scale = loss_scale
        self.segment_scale = loss_scale.value
        self.grads: List[Optional[torch.Tensor]] = [None] * (len(self.leaves) + len(self.params))

    def backward(
        self,
        loss: torch.Tensor,
        outputs: Sequence[torch.Tensor] = (),
        output_grads: Sequence[torch.Tensor] = (),
        wrt: Sequence[torch.Tensor] = (),
    ) -> List[Optional[torch.Tensor]]:
        """Backpropagate one segment, the scalar ``loss`` plus ``outputs`` receiving ``output_grads``
        (gradients returned by an earlier call, already in the segment scale), into the stash; its graph
        is freed. Returns the gradients (in the segment scale, None where unused) of the extra tensors
        ``wrt``, leaves the caller made for the segment's own inputs."""
        targets = (*self.leaves, *self.params)
        positions = [i for i, t in enumerate(targets) if t.requires_grad]
        grads = torch.autograd.grad(
            [loss * self.segment_scale, *outputs],
            [targets[i] for i in positions] + list(wrt),
            grad_outputs=[None, *output_grads],
            allow_unused=True,
        )
        for i, g in zip(positions, grads):
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g
        return list(grads[len(positions):])

    def attach(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor equal to the (detached) scalar ``value`` whose backward delivers the stash to the
        real inputs and the parameters."""
        inputs = (*self.real_inputs, *self.params)
        if not any(t.requires_grad for t in inputs):
            return value.detach()
        return _ReturnStashedGradients.apply(value.detach(), self, *inputs)
