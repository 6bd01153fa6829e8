"""CUDA-graph replay of one denoiser forward for a fixed call signature (DESIGN §5).

Eager diffusers is bound by kernel launches on an H100 (MEASUREMENTS: graph replay alone is 2-3.5x faster), so
every steady-state forward the runtime issues runs as a replay: the call's tensors are copied into static input
buffers, the graph replays, and the output tensors are the graph's static outputs (valid until the next replay:
the runtime copies what it keeps). Anything the forward reads that is not an argument (the runtime's stored block
outputs) must stay at the same address across replays: see runtime.py, Note [static buffers].
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["CapturedCall", "signature_of"]

log = logging.getLogger("asyncdiff_rt")


def signature_of(tree: Any) -> tuple:
    """What a graph is specialised on: tensor shapes, dtypes, devices and every non-tensor value."""
    leaves, spec = pytree.tree_flatten(tree)
    sig = tuple(
        (tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor) else ("v", repr(x))
        for x in leaves
    )
    return sig, str(spec)


class CapturedCall:
    """`fn(*args, **kwargs)` captured once as a CUDA graph and replayed with new argument values."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, warmup: int = 2, pool: Any = None):
        self.fn = fn
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.static = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(self.static, self.spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, autotuning, allocator growth
            for _ in range(warmup):
                fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            output = fn(*static_args, **static_kwargs)
        self.out_leaves, self.out_spec = pytree.tree_flatten(output)

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        for dst, src in zip(self.static, leaves):
            if isinstance(dst, torch.Tensor) and src is not dst:
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        # a new container each time, around the same static tensors: callers may edit the container
        return pytree.tree_unflatten(self.out_leaves, self.out_spec)
