"""CUDA-graph replay of PatchParallel's forwards (DESIGN §10, §12), eager wherever capture fails.

Note [patch graphs]
    The first step of a call signature runs eagerly: it registers the exchange points and their shapes
    (exchange.py). Every later forward is captured once per *slot key* and call signature and replayed after;
    the key says which slots it writes and reads. An exact step (warm-up, `full_sync`) reads and writes slot
    k % 2 only: key `("exact", k % 2)` (eager with OVERLAP_ENV=0),
    two graphs, shared by every sync mode, captured with the transport's
    ops inside (inline, below; on eager warm-up steps the host waited at every point and the GPU idled while it
    caught up). A stale step's key is (the slot it writes, the slot it reads), `((k % 2), (k - 1) % 2)` — two
    graphs, one per step parity — one graph for `no_sync` (writes nothing, always reads step W-1's
    slot) and `naive` (exchanges nothing). Per-parity graphs rather than fixed read/write pointers: the slots
    are already static double buffers (exchange.py, Note [slots]) whose addresses the layers bake into the
    graph, so swapping pointers would mean copying a slot per step or indirecting every layer; graphs of
    one pool cost only their kernel-parameter memory. The step index never reaches the graph: the key carries
    its parity, the timestep and every other tensor argument go through the executor's static inputs
    (runtime/executor.py), and a Python-number timestep is turned into the tensor the UNet would make of it, so
    that it does not become part of the signature (one graph per step) or a baked constant.

    What the captured forward does: each layer writes its fresh values into the static write slot
    (`PatchExchange.share`) and reads the other patches' stale ones from the read slot. What runs right after
    the replay, eagerly but only enqueued (no host synchronisation): the step's closing exchanges
    (`PatchExchange.end_step`), the output rows with the halos and moments into static buffers, then K/V. They
    go on the transport's communication streams, which wait for the caller's current stream (so for the replay);
    the current stream waits for the first again at once, and for K/V only at the next step's first stale K/V
    read, an event-wait node of that step's graph (exchange.py, Note [deferred K/V]; Note [stream ordering] in
    csrc/streams.h). Keeping them out of the graph keeps every step's communication under the transport's
    throttle and watchdog (captured ops are invisible to both) and keeps a capture failure local to one rank:
    eager and replayed steps issue the same messages, so a rank that falls back needs no agreement.

    Exact steps and `sync_gn`'s exchange fresh values inside the forward. On shm, ipc and nccl on CUDA those ops
    are capturable, so those forwards are captured too ("inline" graphs), with the transport's ops inside and
    without eager warm-up runs (which would send real messages; the registering step ran the same layers). A
    replayed shm op reuses the slot parity of its capture, so every rank must capture the same forwards at the
    same step or none: after each inline capture the ranks agree (a host all-gather, once per graph); if any
    failed, every rank drops its graph, rolls its transport's message counters back over the captured ops that
    never ran, and runs those forwards eagerly from then on. On other transports they stay eager.

    A captured shm op bakes its channel's addresses, but shm replaces a channel that a message outgrows (shm.py,
    Note [shm generations]). `sync_gn`'s first packed exchange (halos and K/V of every point at once, after the
    first steady forward) outgrows every warm-up message: the graph captured before it then kept the closed
    channel, and a capture after it could close the retired one while capturing. So before the first inline
    capture the transport is sized for the steady packed exchange (`prepare`), and shm never closes a retired
    channel while a capture runs. `full_sync` has no packed exchange, which is why its graphs were not hit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ...runtime.executor import CapturedCall, Executor, signature_of

__all__ = ["PatchGraphs", "tensor_timestep"]

log = logging.getLogger("asyncdiff_rt")

CAPTURABLE_TRANSPORTS = ("shm", "ipc", "nccl")  # stream-ordered ops that may be captured into a CUDA graph


def tensor_timestep(t: Any, device: torch.device) -> Any:
    """A Python-number timestep as the 0-d tensor diffusers' UNet makes of it (float64 / int64 on the sample's
    device), so that it reaches the graph as a static input; tensors pass unchanged."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return t
    return torch.tensor(t, dtype=torch.float64 if isinstance(t, float) else torch.int64, device=device)


# Sync modes whose graphs matched eager and the simulator on an H200 (tests/cuda/test_patch_cuda.py, 2026-12-02):
# graphs = eager at 1e-4 in float32 and graphs = eager = simulator at 1e-8 in float64 (corrected_async_gn, sync_gn;
# corrected_async_gn's float32 result is too ill-conditioned to compare across kernels at 1e-4, see the test).
# naive and separate_gn are not run there yet.
GRAPH_VERIFIED_MODES = frozenset({"corrected_async_gn", "stale_gn", "no_sync", "full_sync", "sync_gn"})
# Set to 1 (tests/cuda/test_patch_cuda.py) to capture the other modes' graphs too, to compare them with eager.
UNVERIFIED_ENV = "ASYNCDIFF_RT_UNVERIFIED_PATCH_GRAPHS"


# Exact-step graphs and the deferred K/V wait (exchange.py, Note [deferred K/V]): on by default since
# tests/cuda/test_patch_cuda.py passed with them (H200, 2026-12-03, with `await_deferred`: 16 passed; graphs = eager
# in every mode, float64 = the simulator; tests/GPU_RESULTS.md); set this variable to 0 to measure or test without.
OVERLAP_ENV = "ASYNCDIFF_RT_PATCH_OVERLAP"


def overlap_enabled() -> bool:
    """Whether exact steps replay from graphs and K/V waits are deferred (on unless OVERLAP_ENV=0)."""
    return os.environ.get(OVERLAP_ENV, "1") != "0"


def graphs_allowed(sync_mode: str) -> bool:
    """Whether `sync_mode`'s steady forwards may replay from CUDA graphs (verified, or forced by UNVERIFIED_ENV)."""
    return sync_mode in GRAPH_VERIFIED_MODES or os.environ.get(UNVERIFIED_ENV) == "1"


class PatchGraphs:
    """The graphs of one PatchParallel rank (Note [patch graphs]); `enabled` False: every forward eager."""

    def __init__(self, device: torch.device, graphs: bool | None, transport: Any, sync_mode: str = "stale_gn"):
        wanted = device.type == "cuda" if graphs is None else bool(graphs)
        if wanted and device.type != "cuda":
            log.info("asyncdiff_rt: PatchParallel(graphs=True) on %s: CUDA graphs need a CUDA device, eager", device)
        if wanted and device.type == "cuda" and not graphs_allowed(sync_mode):
            log.warning(
                "asyncdiff_rt: PatchParallel(sync_mode=%r) runs eagerly: its CUDA graphs are not verified yet "
                "(verified: %s)", sync_mode, ", ".join(sorted(GRAPH_VERIFIED_MODES)),
            )  # fmt: skip
            wanted = False
        self.enabled = wanted and device.type == "cuda"
        self.transport = transport
        self.executor = Executor(device, self.enabled, compile=False)
        self.inline = self.enabled and getattr(transport, "name", "") in CAPTURABLE_TRANSPORTS
        self._inline_graphs: dict[Any, CapturedCall] = {}
        self._prepared = False  # the transport sized for the steady packed exchange (Note [patch graphs])

    @property
    def captures(self) -> int:
        """Graphs captured so far (both kinds; dropped ones included)."""
        return self.executor.captures + len(self._inline_graphs)

    def clear(self) -> None:
        """A new call signature (new exchange buffers): drop every graph."""
        self.executor.clear()
        self._inline_graphs.clear()
        self._prepared = False

    def run(
        self, fn: Callable, key: Any, args: tuple, kwargs: dict, comm_inside: bool, prepare: Callable | None = None
    ) -> Any:
        """`fn(*args, **kwargs)`, replayed from the graph of `key` and the arguments' signature where possible.
        `comm_inside`: the forward issues transport ops (fresh exchanges) while it runs; `prepare()` then sizes the
        transport for every later message, once before the first such capture."""
        if not comm_inside:
            if not self.executor.use_graphs:
                return fn(*args, **kwargs)
            return self.executor.run(fn, key, args, kwargs, {})[0]
        if not (self.inline and self.executor.use_graphs):
            return fn(*args, **kwargs)
        full_key = (key, signature_of((args, kwargs)))
        graph = self._inline_graphs.get(full_key)
        if graph is None:
            if prepare is not None and not self._prepared:
                prepare()  # eagerly, on every rank alike: the inline captures happen at the same steps everywhere
                self._prepared = True
            graph = self._capture_inline(fn, args, kwargs)
            if graph is None:
                return fn(*args, **kwargs)
            self._inline_graphs[full_key] = graph
        return graph(args, kwargs)

    def _capture_inline(self, fn: Callable, args: tuple, kwargs: dict) -> CapturedCall | None:
        """Capture a forward with the transport's ops inside, on every rank or none (Note [patch graphs])."""
        counters = self.transport.message_counters()
        graph, reason = None, ""
        try:
            if self.executor._pool is None:
                self.executor._pool = torch.cuda.graph_pool_handle()
            graph = CapturedCall(fn, args, kwargs, warmup=0, pool=self.executor._pool)
        except Exception as err:  # noqa: BLE001 - eager is always correct
            reason = f"{type(err).__name__}: {err}"
        everyone = self.transport.all_gather_object(reason, phase="CUDA graph capture agreement")
        failed = [(rank, why) for rank, why in enumerate(everyone) if why]
        if not failed:
            return graph
        # none of the captured ops ran: this rank's messages continue from where they were before the capture
        self.transport.restore_message_counters(counters)
        self.inline = False
        rank, why = failed[0]
        log.warning(
            "asyncdiff_rt: PatchParallel: CUDA graph capture of a forward with exchanges inside failed on rank %d "
            "(%s): every rank runs those forwards eagerly",
            rank,
            why,
        )
        return None
