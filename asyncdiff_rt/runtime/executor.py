"""The executor: every forward a strategy issues, replayed from a CUDA graph per call signature, compiled first if
asked, eager where capture fails (the reason logged).

Eager diffusers is bound by kernel launches on an H100 (MEASUREMENTS: graph replay alone is 2-3.5x faster), so
every steady-state forward the runtime issues runs as a replay: the call's tensors are copied into static input
buffers, the graph replays, and the output tensors are the graph's static outputs (valid until the next replay:
the runtime copies what it keeps). Anything the forward reads that is not an argument (the runtime's stored block
outputs) must stay at the same address across replays: see runtime/buffers.py, Note [static buffers].
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["CapturedCall", "Executor", "signature_of"]

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


class Executor:
    """Runs `fn(*args, **kwargs)` for a strategy: eagerly, or as the replay of a graph captured on first use.

    A forward may fill a `side` dict while it runs (the owned block outputs a rank keeps for its peers); those
    tensors are static outputs of the graph too, so the dict filled during capture is returned on each replay.
    All graphs of one instance share one memory pool: they replay one after another, never at once.
    """

    def __init__(self, device: torch.device, graphs: bool | None, compile: bool):
        self.use_graphs = device.type == "cuda" if graphs is None else bool(graphs)
        self.compile = compile
        self.captures = 0  # graphs captured so far (a prepared instance captures nothing on its first call)
        self._graphs: dict[Any, CapturedCall] = {}
        self._pool: Any = None
        self._compiled: dict[int, Callable] = {}

    def clear(self) -> None:
        """A new call signature: drop every graph (their static buffers belong to the old shapes)."""
        self._graphs.clear()
        self._pool = None

    def _function(self, fn: Callable) -> Callable:
        if not self.compile:
            return fn
        key = id(fn)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False)
        return self._compiled[key]

    def run(self, fn: Callable, key: Any, args: tuple, kwargs: dict, side: dict) -> tuple[Any, dict]:
        """(output, side): `key` names what else the forward depends on besides its arguments' signature."""
        fn = self._function(fn)
        if not self.use_graphs:
            return fn(*args, **kwargs), side
        full_key = (key, signature_of((args, kwargs)))
        graph = self._graphs.get(full_key)
        if graph is None:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = CapturedCall(fn, args, kwargs, pool=self._pool)
            except Exception as err:  # noqa: BLE001 - eager is always correct
                log.warning("asyncdiff_rt: CUDA graph capture failed, running eagerly: %s", err)
                self.use_graphs = False
                side.clear()
                return fn(*args, **kwargs), side
            graph.side = dict(side)  # what the captured forward filled: static tensors, refreshed by each replay
            self._graphs[full_key] = graph
            self.captures += 1
        out = graph(args, kwargs)
        return out, graph.side
