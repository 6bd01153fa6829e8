"""The segments strategy's step: warm-up as a sequential chain across ranks, compute rounds on the previous
round's cross-segment outputs, stride 2's pairs of steps and their ε (docs/strategies.md).

Note [step ordering]
    Every rank runs the pipeline's own loop, so every rank calls the denoiser once per step, in the same order.
    At step k each rank looks up `Step` k of the schedule and does the same collective calls in the same order:
    ROUND -> its forward, one `exchange` of block outputs, one `broadcast` of ε (two with stride_eps="fresh");
    EXACT -> the sequential forward, one `broadcast` of ε; REUSE -> nothing. Received block outputs land in the
    static store (runtime/buffers.py) and are replayed as fresh tensors, so the outputs replayed at step k are
    those of step k-1 however the glue writes in place. ε reaches every rank, so the scheduler step, CFG and
    callbacks run unchanged on every rank and the latents stay identical everywhere.

Note [dead tail]
    In a round, a rank whose segment does not produce the denoiser's output (every segment but the last) needs
    nothing of its forward after its last owned block: its output is overwritten by the ε broadcast. Yet the
    forward would go on through the rest of the glue (a UNet's up-path concatenations and GroupNorms at full
    resolution, the output norm), on every such rank. So the last owned block raises `_SegmentDone` once its
    output is recorded, and the forward returns a zero output of the right structure instead (`_dead`). Off
    where the rest could matter: a LoRA scale other than 1 (diffusers unscales the LoRA layers at the end of the
    forward), torch.compile, an owned block called twice, no trace. The sent outputs are unchanged, so results
    are too.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ...compiler.layouts import call_signature, trace_layouts
from ...compiler.plan import Plan
from ...models.denoiser import TimestepArg, first_tensor, replace_first_tensor
from ...runtime.buffers import BlockStore, tensors
from ...runtime.executor import Executor
from ...runtime.timeline import Timeline
from .routing import View, make_views
from .schedule import EXACT, REUSE, Step

__all__ = ["SegmentStepper"]


def _snapshot(output: Any) -> tuple[list[Any], Any]:
    """Leaves of a block's output, detached copies: glue may write in place after the block returns."""
    leaves, spec = pytree.tree_flatten(output)
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec


def _clone_first(out: Any) -> Any:
    return replace_first_tensor(out, first_tensor(out).clone())


def _container(out: Any) -> Any:
    """A new container around the same tensors (tensors and tuples are never edited in place)."""
    return out if isinstance(out, (torch.Tensor, tuple)) else copy.copy(out)


class _SegmentDone(Exception):
    """Raised by a rank's last owned block to end a forward whose remaining glue it does not need (Note [dead
    tail])."""


def _scaled_lora(bound: Any) -> bool:
    """Whether the call asks for a LoRA scale other than 1 (`cross_attention_kwargs` / `joint_attention_kwargs` /
    `attention_kwargs` with "scale"): diffusers undoes that scaling at the end of the forward."""
    for name, value in bound.arguments.items():
        if name.endswith("attention_kwargs") and isinstance(value, dict) and value.get("scale", 1.0) != 1.0:
            return True
    return False


class SegmentStepper:
    """Everything one rank (or, with `local`, every rank view) does at each denoiser call of a pipeline loop."""

    def __init__(
        self,
        plan: Plan,
        stride: int,
        rank: int,
        rank_views: list[int],
        transport: Any,
        executor: Executor,
        store: BlockStore,
        timeline: Timeline,
        twin: torch.nn.Module | None,
        sequential_warm_up: bool,
        adapter: Any,
    ):
        self.adapter = adapter  # how the pipeline passes τ (models/base.py)
        self.plan, self.model_n, self.stride = plan, plan.model_n, stride
        self.rank, self.rank_views, self.local = rank, rank_views, len(rank_views) > 1 or transport.name == "local"
        self.transport, self.executor, self.store, self.timeline = transport, executor, store, timeline
        self.twin = twin
        self.sequential_warm_up = sequential_warm_up  # dropped weights: warm-up hands outputs on along the chain
        self.owner = plan.owner()
        self.views = make_views(plan, stride, rank_views)
        self.trace: Any = None
        self._shape_key: Any = None
        # per forward: who computes (None: every block), which owned outputs to keep, and what was kept
        self._view: View | None = None
        self._recording: frozenset = frozenset()
        self._sequential = False
        self._fresh: dict[str, tuple[list[Any], Any]] = {}
        self._exit_after: str | None = None  # the block whose output ends this forward (Note [dead tail])
        self._last_owned: dict[int, str] = {}
        self._dead: Any = None  # a zero output of the denoiser's structure (Note [dead tail]), per call signature
        self.reset()

    def reset(self) -> None:
        self.schedule: list[Step] = []
        self.warm_up = 1
        self.tau: torch.Tensor | None = None  # the scheduler's τ of this call's loop, on the sample's device
        self.tau_values: list[float] = []  # the same on the host
        self.pending_eps: torch.Tensor | None = None  # stride 2: ε of the pair's second step
        self.template: Any = None
        self._fresh = {}

    # ------------------------------------------------------------------------------------------ shapes
    def prepare_shape(self, args: tuple, kwargs: dict) -> bool:
        """Per call signature: trace the meta twin for data flow and block layouts (no weights needed), route,
        and allocate the static store. A new resolution keeps the plan. True if anything was (re)built."""
        key = call_signature((args, kwargs))
        if key == self._shape_key:
            return False
        self.executor.clear()
        if self.twin is not None:
            self.trace, layouts = trace_layouts(self.twin, self.plan.blocks, args, kwargs)
            self.views = make_views(self.plan, self.stride, self.rank_views, self.trace)
            self.store.allocate(layouts, set().union(*(v.needs for v in self.views)))
        self._last_owned = self._tails()
        self._dead = None
        self._shape_key = key
        return True

    def _tails(self) -> dict[int, str]:
        """Per view that may end its forward early (Note [dead tail]): its last owned block in call order."""
        if self.trace is None or self.executor.compile:
            return {}
        order = {b: i for i, b in enumerate(self.trace.order)}
        out = {}
        for view in self.views:
            owned = [b for b in view.owned if b in order]
            if view.segment == self.model_n - 1 or not owned:
                continue
            if any(self.trace.blocks[b].calls != 1 for b in owned):
                continue
            out[view.rank] = max(owned, key=order.__getitem__)
        return out

    # ------------------------------------------------------------------------------------------ interception
    def block_forward(self, name: str, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            view = self._view
            if view is None or name in view.owned:
                out = original(*args, **kwargs)
                if name in self._recording:
                    self._fresh[name] = _snapshot(out)
                    if self._sequential:
                        self._send_now(name)
                if name == self._exit_after:
                    raise _SegmentDone
                return out
            if self._sequential:
                return self._receive_now(name)
            return self.store.replay(name)

        return forward

    def _send_now(self, name: str) -> None:
        """Sequential warm-up: hand a fresh owned output to the ranks that read it, as soon as it exists."""
        leaves = tensors(self._fresh[name][0])
        sends = {p: leaves for p, blocks in self.views[0].send_to.items() if name in blocks}
        self.transport.exchange(self._k, sends, {})

    def _receive_now(self, name: str) -> Any:
        """Sequential warm-up: a block another rank owns; its fresh output arrives from the owner (if read)."""
        if name not in self.views[0].needs:
            return self.store.placeholder(name)
        owner = self.owner[name]  # rank r < n owns segment r
        self.transport.exchange(self._k, {}, {owner: self.store.leaves([name])})  # lands where round 1 replays
        return self.store.replay(name)

    # ------------------------------------------------------------------------------------------ steps
    def step(self, k: int, original: Any, bound: Any, args: tuple, kwargs: dict) -> Any:
        self._k = k
        step = self.schedule[k]
        if step.kind == EXACT:
            return self._exact_step(k, original, args, kwargs)
        if step.kind == REUSE:
            eps, self.pending_eps = self.pending_eps, None
            return replace_first_tensor(self.template, eps)
        return self._round(step, original, bound)

    def _run(
        self, original: Any, view: View | None, recording: frozenset, args: tuple, kwargs: dict, exit_after=None
    ) -> Any:
        """One forward of the denoiser as `view` sees it, through the executor (graphs, compile); `exit_after`:
        the block that ends it (Note [dead tail])."""
        self._view, self._recording, self._fresh, self._exit_after = view, recording, {}, exit_after
        fn = original if exit_after is None else self._until_done(original)
        try:
            key = (view.rank if view is not None else None, recording, exit_after)
            out, self._fresh = self.executor.run(fn, key, args, kwargs, self._fresh)
            return out
        finally:
            self._view, self._recording, self._exit_after = None, frozenset(), None

    def _until_done(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except _SegmentDone:
                return _container(self._dead)  # a new one: the caller replaces its first tensor

        return forward

    def _keep_dead(self, out: Any) -> None:
        """A zero output of the structure of `out` (a full forward's), once per call signature."""
        if self._dead is None:
            self._dead = replace_first_tensor(_container(out), torch.zeros_like(first_tensor(out)))

    def _exact_step(self, k: int, original: Any, args: tuple, kwargs: dict) -> Any:
        """Warm-up: the whole denoiser, exactly. With all weights here every rank computes it all; with dropped
        weights it runs as a sequential pipeline across ranks, each owner handing its fresh outputs on. Either
        way the block outputs of the last warm-up step seed the first asynchronous round."""
        last_warm_up = k == self.warm_up - 1 and k + 1 < len(self.schedule)
        with self.timeline.span("warm-up", k):
            if self.sequential_warm_up:
                view = self.views[0]
                self._view, self._recording, self._sequential, self._fresh = view, frozenset(view.sends), True, {}
                try:
                    out = original(*args, **kwargs)
                finally:
                    self._view, self._recording, self._sequential = None, frozenset(), False
            else:
                out = self._run(original, None, self.store.names() if last_warm_up else frozenset(), args, kwargs)
                if last_warm_up:
                    self.store.keep(self._fresh)
        self._keep_dead(out)
        eps = first_tensor(out).clone()  # the pipeline keeps ε (multistep schedulers): never hand out a buffer
        with self.timeline.span("ε", k, "comm"):
            self.transport.broadcast(eps, src=self.model_n - 1, step=k)
        return replace_first_tensor(out, eps)

    def _round(self, step: Step, original: Any, bound: Any) -> Any:
        outs: dict[int, Any] = {}
        fresh: dict[str, tuple[list[Any], Any]] = {}
        passed = bound.arguments["timestep"]
        tau = self.tau if isinstance(passed, torch.Tensor) else self.tau_values  # no host sync
        early = self._dead is not None and not _scaled_lora(bound)
        for view in self.views:
            exit_after = None
            if early and view.rank not in (step.eps_rank, step.next_eps_rank):
                exit_after = self._last_owned.get(view.rank)
            t = self.adapter.timestep_as_passed(tau[step.t_index[view.rank]], passed)
            args, kwargs = TimestepArg.substitute(bound, t)
            recording = frozenset(view.sends) if view.rank < self.model_n else frozenset()
            lane = "compute" if len(self.views) == 1 else f"view {view.rank}"
            with self.timeline.span("compute", step.k, lane):
                out = self._run(original, view, recording, args, kwargs, exit_after)
            outs[view.rank] = out if len(self.views) == 1 else _clone_first(out)  # a graph's output is reused
            fresh.update(self._fresh)
        if self.local:
            self.store.keep(fresh)
            eps = first_tensor(outs[step.eps_rank]).clone()
            out = outs[step.eps_rank]
            if step.next_eps_rank >= 0:
                self.pending_eps = first_tensor(outs[step.next_eps_rank]).clone()
        else:
            with self.timeline.span("exchange", step.k, "comm"):
                self._exchange(step.k, fresh)
            out = outs[self.rank]
            mine = first_tensor(out)
            eps = mine.clone()  # the broadcast overwrites it; the pipeline keeps it
            with self.timeline.span("ε", step.k, "comm"):
                self.transport.broadcast(eps, src=step.eps_rank, step=step.k)
            if step.next_eps_rank >= 0:
                nxt = mine.clone() if self.rank == step.next_eps_rank else torch.empty_like(eps)
                self.transport.broadcast(nxt, src=step.next_eps_rank, step=step.k)
                self.pending_eps = nxt
        if self.stride == 2 and self.pending_eps is None and step.k + 1 < len(self.schedule):
            self.pending_eps = eps.clone()
        out = replace_first_tensor(out, eps)
        if self.stride == 2:
            self.template = out
        return out

    def _exchange(self, k: int, fresh: dict[str, tuple[list[Any], Any]]) -> None:
        """Owned outputs to the ranks that read them; theirs into the static store, in place (the forward that
        read the store has been issued before: the transport orders the receive after it)."""
        view = self.views[0]
        sends = {peer: [x for b in blocks for x in tensors(fresh[b][0])] for peer, blocks in view.send_to.items()}
        recvs = {peer: self.store.leaves(blocks) for peer, blocks in view.recv_from.items()}
        self.transport.exchange(k, sends, recvs)
