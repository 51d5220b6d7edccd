"""``CUDAGraphCache``: record a tensor function as a CUDA graph once per input signature, then replay it.

DEQDet's inference at ``TOL = 0`` is a fixed sequence of kernels (the init stage, 20 + 1 applications
of the refinement stage) with no host synchronisation (:mod:`.solver`), many of them small: on a GPU
the launches, not the arithmetic, bound it. ``MODEL.DEQDET.CUDA_GRAPH`` records that sequence once
per input shape and replays it with one launch.

Each signature (shapes, strides, dtypes of the inputs and the autocast state) gets its own graph;
the graphs share one memory pool, which is safe because they are replayed one at a time and each
keeps its static inputs and outputs alive. The least recently used graph is dropped beyond
``capacity`` (a test set resized to a fixed short side has a few dozen padded shapes).
"""

from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Tuple

import torch

__all__ = ["CUDAGraphCache"]


def _autocast_state() -> Tuple:
    if not torch.is_autocast_enabled("cuda"):
        return (False,)
    return True, torch.get_autocast_dtype("cuda")


class CUDAGraphCache:
    """``cache(*inputs)`` returns what ``fn(*inputs)`` returns (a tuple of tensors), computed by the
    replay of a CUDA graph of ``fn`` recorded for the inputs' signature.

    ``fn`` must launch the same kernels for every input of a signature and never read a tensor value on
    the host (no ``.item()``, ``.tolist()``, data-dependent shapes, tensors made from host data). It runs
    under ``torch.no_grad``: the outputs carry no gradient. They are fresh tensors (copies of the
    graph's static outputs), so a later replay does not overwrite them.
    """

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]], capacity: int = 32):
        if capacity < 1:
            raise ValueError(f"CUDAGraphCache capacity must be >= 1, got {capacity}")
        self.fn, self.capacity = fn, capacity
        self.graphs = OrderedDict()  # signature -> (static inputs, graph, static outputs)
        self.pool = None

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not all(x.is_cuda for x in inputs):
            raise ValueError("CUDAGraphCache needs CUDA tensors, got devices "
                             f"{sorted({str(x.device) for x in inputs})}")
        key = (tuple((x.shape, x.stride(), x.dtype, x.device) for x in inputs), _autocast_state())
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            self.graphs[key] = self._record(inputs)
            if len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
        static_inputs, graph, static_outputs = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return tuple(out.clone() for out in static_outputs)

    def _record(self, inputs):
        static_inputs = [x.clone() for x in inputs]  # same strides (channels-last maps stay so)
        # Warm-up on a side stream, outside the recording: cuBLAS handles, compiled kernels, lazy state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        autocast = _autocast_state()
        # Autocast's cache of cast weights must stay off while recording: its tensors would be freed
        # into the graph's pool when the autocast region ends, under the recorded kernels' feet.
        context = (torch.autocast("cuda", dtype=autocast[1], cache_enabled=False) if autocast[0]
                   else nullcontext())
        with context, torch.cuda.graph(graph, pool=self.pool):
            static_outputs = tuple(self.fn(*static_inputs))
        return static_inputs, graph, static_outputs
