"""`AsyncDiff`: attach asynchronous denoising to an unchanged diffusers pipeline (DESIGN §2–3).

Note [step ordering]
    Every rank runs the pipeline's own loop, so every rank calls the denoiser once per step, in the same order.
    At step k each rank looks up `Step` k of the schedule (schedule.py) and does the same collective calls in
    the same order: ROUND -> its forward, one `exchange` of block outputs, one `broadcast` of ε (two with
    stride_eps="fresh"); EXACT -> the sequential forward, one `broadcast` of ε; REUSE -> nothing. Received
    block outputs land in fresh tensors, so the outputs replayed at step k are those of step k-1 however the
    glue writes in place. ε reaches every rank, so the scheduler step, CFG and callbacks run unchanged on every
    rank and the latents stay identical everywhere.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ...compiler.plan import Plan, PlanError
from ...errors import ConfigError
from ...models.controlnet import attach_controlnet
from ...models.denoiser import (
    DenoiserError,
    TimestepArg,
    check_scheduler,
    class_forward,
    effective_warm_up,
    find_denoiser,
    first_tensor,
    fresh_copy,
    loop_timesteps,
    replace_first_tensor,
    snapshot,
)
from ...runtime.hooks import CallHook, ForwardOverrides
from ...runtime.timeline import Timeline
from ...transport import TransportError, ensure_process_group, make_transport
from ...transport import resolve as resolve_transport
from .schedule import EXACT, REUSE, Step, make_schedule, roles

__all__ = ["AsyncDiff", "ConfigError"]

log = logging.getLogger("asyncdiff_rt")

# options that make the pipeline call the denoiser more than once per step
MULTI_CALL_OPTIONS = ("skip_guidance_layers",)


@dataclass
class _View:
    """One rank's view of a compute round: the blocks it computes and what it sends and receives."""

    rank: int
    segment: int
    owned: set[str]
    send_to: dict[int, list[str]] = field(default_factory=dict)
    recv_from: dict[int, list[str]] = field(default_factory=dict)
    needs: set[str] = field(default_factory=set)  # non-owned blocks whose outputs this rank reads
    sends: set[str] = field(default_factory=set)  # owned blocks whose outputs some other rank reads


@dataclass
class _CallState:
    k: int = 0
    tau: torch.Tensor | None = None
    tau_host: list[float] = field(default_factory=list)  # τ as host floats: checks must not read the GPU
    passed_timesteps: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # Note [no host sync]
    schedule: list[Step] = field(default_factory=list)
    scale: float = 1.0  # passed timestep / scheduler timestep (1 for diffusers' SD pipelines)
    warm_up: int = 1  # this call's warm-up (see effective_warm_up)
    batch: int | None = None
    pending_eps: torch.Tensor | None = None  # stride 2: ε of the pair's second step
    template: Any = None


class AsyncDiff:
    """Asynchronous denoising for a diffusers pipeline; every rank constructs it and calls the pipeline.

    Args:
        pipeline: a diffusers pipeline with `unet` or `transformer`.
        model_n: number of segments (GPUs); `world_size == model_n + stride - 1`.
        stride: 1 or 2 (stride 2: pairs of steps per compute round, one more rank).
        warm_up: exact steps before the asynchronous ones (>= 1; >= the step count runs exactly).
        time_shift: compute step k with τ[k-1] (the reference's option).
        plan: explicit partition (list of segments of module names, a saved plan file, or a Plan); default: planned.
        transport: "auto", "nccl", "shm", "gloo" or "local" (one process runs every segment).
        group: a torch.distributed sub-group to run in (e.g. 8 GPUs as 2 x model_n=4).
        stride_eps: stride 2 only: "reuse" (ε_{k+1} = ε_k, as the reference) or "fresh".
        timeout_s: every wait on a peer raises after this many seconds.
        debug: check after each step that the latents agree across ranks (also ASYNCDIFF_RT_DEBUG=1).
        drop_weights: free the weights of blocks other ranks own (default: when running one process per rank);
            warm-up then runs as a sequential pipeline across ranks. The pipeline keeps only this rank's blocks.
        height, width: the resolution to plan for when no plan is given (default: the pipeline's default).
        graphs: replay each rank's forward as a CUDA graph (default: on CUDA); eager fallback, logged.
        controlnet: ControlNet pipelines: "blocks" (the ControlNet's blocks are cut into segments with the UNet's
            and follow the stale rule), "replicated" (every rank runs the whole ControlNet each step; its residuals
            are fresh inputs), or "auto" (default: "blocks" for one ControlNetModel — measured cheaper, see
            benchmarks/README.md — "replicated" for several). Ignored for pipelines without a ControlNet.
        compile: torch.compile each rank's whole forward (owned blocks, replays and glue as one region) before
            capturing it; the first call then takes the compile time (DESIGN §5, MEASUREMENTS).
    """

    def __init__(
        self,
        pipeline: Any,
        model_n: int = 2,
        stride: int = 1,
        warm_up: int = 1,
        time_shift: bool = False,
        *,
        plan: Any = None,
        transport: str = "auto",
        group: Any = None,
        stride_eps: str = "reuse",
        timeout_s: float = 60.0,
        debug: bool | None = None,
        drop_weights: bool | None = None,
        height: int | None = None,
        width: int | None = None,
        graphs: bool | None = None,
        compile: bool = False,
        controlnet: str = "auto",
    ):
        if getattr(type(pipeline), "_asyncdiff_rt_hooked", False):
            raise ConfigError("this pipeline already has an AsyncDiff attached: call .remove() on it first")
        self._controlnet = attach_controlnet(pipeline, controlnet, ConfigError)
        try:
            self._setup(
                pipeline, model_n, stride, warm_up, time_shift, plan, transport, group, stride_eps, timeout_s, debug,
                drop_weights, height, width, graphs, compile,
            )  # fmt: skip
        except BaseException:
            if self._controlnet is not None:
                self._controlnet.remove()
            raise

    def _setup(
        self, pipeline, model_n, stride, warm_up, time_shift, plan, transport, group, stride_eps, timeout_s, debug,
        drop_weights, height, width, graphs, compile,
    ) -> None:  # fmt: skip
        # ---- arguments: every check here runs before any communication or denoiser work (DESIGN §6)
        if plan is not None and not isinstance(plan, Plan):
            plan = Plan.from_spec(plan)
        if plan is not None and model_n != plan.model_n:
            if model_n != 2:  # 2 is the default: an explicit plan decides then
                raise ConfigError(f"model_n={model_n} but the plan has {plan.model_n} segments")
            model_n = plan.model_n
        if not isinstance(model_n, int) or model_n < 1:
            raise ConfigError(f"model_n must be an integer >= 1, got {model_n!r}")
        if stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2, got {stride!r}")
        if not isinstance(warm_up, int) or warm_up < 1:
            raise ConfigError(
                f"warm_up must be an integer >= 1, got {warm_up!r}: the first step must be exact "
                "(warm_up >= the number of steps runs the whole loop exactly)"
            )
        if stride_eps not in ("reuse", "fresh"):
            raise ConfigError(f"stride_eps must be 'reuse' or 'fresh', got {stride_eps!r}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")

        self.pipe = pipeline
        self._height, self._width = height, width
        self.denoiser_attr, self.denoiser = find_denoiser(pipeline)
        if any(getattr(part, "_asyncdiff_rt_dropped", False) for part in _with_parts(self.denoiser)):
            raise ConfigError(
                "this denoiser's weights were partly freed by an earlier AsyncDiff (drop_weights=True): "
                "load the pipeline again, or pass drop_weights=False to keep full weights"
            )
        check_scheduler(pipeline.scheduler)
        _check_not_offloaded(self.denoiser)
        param = next(self.denoiser.parameters())
        self.device, self.dtype = param.device, param.dtype

        self.model_n, self.stride, self.warm_up, self.time_shift = model_n, stride, warm_up, time_shift
        self.stride_eps, self.timeout_s = stride_eps, timeout_s
        self.debug = bool(int(os.environ.get("ASYNCDIFF_RT_DEBUG", "0"))) if debug is None else debug
        self.world_needed = model_n + stride - 1

        if plan is not None:
            plan.validate(self.denoiser)  # unknown modules, duplicates, module + parent: before any communication
        else:
            from ...compiler.blocks import candidate_blocks

            n_blocks = len(candidate_blocks(self.denoiser))
            if model_n > n_blocks:
                raise ConfigError(
                    f"model_n={model_n} is larger than the {n_blocks} blocks {type(self.denoiser).__name__} can be "
                    f"cut into: use model_n <= {n_blocks}"
                )

        # ---- ranks: one process per rank, or every rank in this process ("local")
        self.transport_name = resolve_transport(transport, self.device)
        if self.transport_name == "local" or (self.world_needed == 1 and group is None and not _dist_ready()):
            self.transport_name = "local"
            self.transport = make_transport("local", self.device, None, timeout_s)
            self.rank, self.world_size = 0, 1
            view_ranks = list(range(self.world_needed))
        else:
            ensure_process_group(self.device, timeout_s, self.transport_name)
            import torch.distributed as dist

            world = dist.get_world_size(group)
            if world != self.world_needed:
                raise ConfigError(
                    f"model_n={model_n}, stride={stride} needs {self.world_needed} processes "
                    f"(model_n + stride - 1) but the group has {world}: launch with "
                    f"`torchrun --nproc_per_node={self.world_needed}`, pass group= with {self.world_needed} ranks, "
                    "or use transport='local'"
                )
            self.transport = make_transport(self.transport_name, self.device, group, timeout_s)
            self.rank, self.world_size = self.transport.rank, self.transport.world_size
            view_ranks = [self.rank]

        # ---- plan: rank 0 decides and broadcasts; every rank checks hash, dtype and device type
        try:
            if plan is None and model_n == 1:
                from ...compiler.blocks import candidate_blocks

                plan = Plan.from_spec([candidate_blocks(self.denoiser)])  # one segment: nothing to balance
            if plan is None:
                decided = self._plan_on_rank0() if self.rank == 0 else None
                status, text = self.transport.broadcast_object(decided, src=0)
                if status != "ok":  # every rank fails alike, none is left waiting
                    raise ConfigError(f"rank 0 could not plan the partition: {text}")
                plan = Plan.from_json(text)
                plan.validate(self.denoiser)
            self._agree(plan)
        except (ConfigError, PlanError, DenoiserError):
            self.transport.close()
            raise
        self.plan = plan
        self._view_ranks = view_ranks
        self._owner = plan.owner()
        self._segments = roles(model_n, stride)
        self._views = [self._make_view(r, None) for r in view_ranks]
        self._shape_key: Any = None  # the call signature the current trace and views belong to
        self._twin = _meta_twin(self.denoiser) if model_n > 1 else None
        self._trace: Any = None
        self._specs: dict[str, tuple[Any, list[Any]]] = {}  # block -> (tree spec, example leaves on meta)
        self._placeholders: dict[str, Any] = {}
        self._sequential = False
        self.dropped_bytes = 0
        if drop_weights is None:
            drop_weights = self.world_size > 1
        if drop_weights and self.world_size > 1:
            self.dropped_bytes = self._drop_weights()
        self._store: dict[str, tuple[list[Any], Any]] = {}  # non-owned block -> its owner's last output
        self._fresh: dict[str, tuple[list[Any], Any]] = {}  # owned block -> this round's output
        self._view: _View | None = None  # None: every block computes (exact step)
        self._recording: frozenset = frozenset()  # owned blocks whose outputs this forward keeps
        self._graphs: dict[Any, Any] = {}
        self._graph_pool: Any = None  # one memory pool for all our graphs: they replay one after another
        self._use_graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        self._compile = compile
        self._compiled: Any = None
        self.timeline = Timeline(self.device)
        self._state = _CallState()
        self._saved_progress: dict | None = None

        # ---- hooks (last: nothing is installed if anything above raised)
        self._timestep_arg = TimestepArg(class_forward(self.denoiser))
        self._overrides = ForwardOverrides()
        modules = dict(self.denoiser.named_modules())
        for name in plan.blocks if self.world_needed > 1 else ():  # one segment: nothing to replay or send
            self._overrides.install(modules[name], lambda orig, name=name: self._block_forward(name, orig))
        self._overrides.install(self.denoiser, self._denoiser_forward)
        call_signature = inspect.signature(type(pipeline).__call__)
        self._call_params = set(call_signature.parameters)
        steps_param = call_signature.parameters.get("num_inference_steps")
        self._default_steps = steps_param.default if steps_param is not None else None
        self._call_steps: Any = None
        self._call_hook = CallHook(pipeline, self._before_call, self._after_call)

    # ------------------------------------------------------------------------------------------ public API
    def reset_state(self, warm_up: int | None = None) -> None:
        """Forget the current call's state; optionally set a new warm-up (the reference's API). State also
        resets by itself at the start of every pipeline call."""
        if warm_up is not None:
            if not isinstance(warm_up, int) or warm_up < 1:
                raise ConfigError(f"warm_up must be an integer >= 1, got {warm_up!r}")
            self.warm_up = warm_up
        self._state = _CallState()
        self._fresh = {}

    def record_timeline(self, enabled: bool = True) -> None:
        """Record compute and communication spans of the following pipeline calls (timeline.py)."""
        self.timeline.enabled = enabled
        self.timeline.clear()

    def gather_timeline(self) -> list[list[dict[str, Any]]]:
        """Every rank's spans of the last recorded call, in rank order (a collective: call it on every rank)."""
        return self.transport.all_gather_object(self.timeline.intervals())

    def schedule(self, num_steps: int) -> list[Step]:
        return make_schedule(num_steps, self.model_n, self.stride, self.warm_up, self.time_shift, self.stride_eps)

    def remove(self) -> None:
        """Take the hooks out: the pipeline is again plain diffusers."""
        self._overrides.remove()
        self._call_hook.remove()
        if self._controlnet is not None:
            self._controlnet.remove()
        self.transport.close()

    # ------------------------------------------------------------------------------------------ set-up
    def _plan_on_rank0(self) -> tuple[str, str]:
        """("ok", plan JSON) or ("error", why): rank 0 measures and partitions, then tells every rank."""
        from ...compiler.planning import plan_for

        try:
            plan = plan_for(
                self.pipe,
                self.model_n,
                height=self._height,  # None: the pipeline's default size (planning.default_resolution)
                width=self._width,
                repeats=20 if self.device.type == "cuda" else 3,  # CPU timings are coarse anyway
                controlnet="replicated",  # install nothing more: a ControlNet listed as blocks is installed already
            )
        except Exception as err:  # noqa: BLE001 - reported on every rank
            log.exception("asyncdiff_rt: planning failed")
            return "error", f"{type(err).__name__}: {err}"
        return "ok", plan.to_json()

    def _agree(self, plan: Plan) -> None:
        from ... import __version__

        mine = {
            "plan": plan.hash(),
            "dtype": str(self.dtype),
            "device": self.device.type,
            "config": (self.model_n, self.stride, self.warm_up, self.time_shift, self.stride_eps),
            "version": __version__,
        }
        everyone = self.transport.all_gather_object(mine)
        for key in mine:
            values = [e[key] for e in everyone]
            if any(v != values[0] for v in values):
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ConfigError(f"ranks disagree on {key} ({per_rank}): every rank must be configured alike")

    def _make_view(self, rank: int, trace: Any) -> _View:
        """Who sends what to whom: with a trace, only the outputs a rank's blocks (or its output) read."""
        seg = self._segments[rank]
        view = _View(rank, seg, set(self.plan.segments[seg].blocks))
        senders = range(self.model_n)  # ranks 0..n-1 own S_0..S_{n-1}; rank n (stride 2) sends nothing

        def needs(r: int) -> set[str]:
            s = self._segments[r]
            owned = set(self.plan.segments[s].blocks)
            if trace is None:
                return set(self.plan.blocks) - owned
            return trace.needed_by(owned, owns_output=s == self.model_n - 1)

        mine = needs(rank)
        for peer, peer_seg in enumerate(self._segments):
            if peer == rank or peer_seg == seg:
                continue
            if rank in senders:
                theirs = needs(peer)
                view.send_to[peer] = [b for b in self.plan.blocks if self._owner[b] == seg and b in theirs]
            if peer in senders:
                view.recv_from[peer] = [b for b in self.plan.blocks if self._owner[b] == peer_seg and b in mine]
        view.send_to = {p: bs for p, bs in view.send_to.items() if bs}
        view.recv_from = {p: bs for p, bs in view.recv_from.items() if bs}
        view.needs = mine
        view.sends = {b for bs in view.send_to.values() for b in bs}
        return view

    def _drop_weights(self) -> int:
        """Free every parameter and buffer of the blocks this rank does not own (DESIGN §4: memory)."""
        modules = dict(self.denoiser.named_modules())
        owned = self._views[0].owned
        freed = 0
        for name in self.plan.blocks:
            if name in owned:
                continue
            for t in list(modules[name].parameters()) + list(modules[name].buffers()):
                freed += t.numel() * t.element_size()
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        for part in _with_parts(self.denoiser):
            part._asyncdiff_rt_dropped = True
        return freed

    def parameter_bytes(self) -> int:
        """Bytes of denoiser weights this rank holds (own blocks + replicated modules)."""
        tensors = list(self.denoiser.parameters()) + list(self.denoiser.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _prepare_shape(self, bound: Any) -> None:
        """Per call signature: trace the meta twin for data flow and block output layouts (no weights needed),
        then allocate the static buffers of Note [static buffers]. A new resolution keeps the plan."""
        key = _signature(bound.arguments)
        if key == self._shape_key:
            return
        self._graphs.clear()
        self._graph_pool = None
        self._store, self._placeholders, self._specs = {}, {}, {}
        if self._twin is not None:
            self._trace, self._specs = _trace_twin(self._twin, self.plan.blocks, bound)
            self._views = [self._make_view(r, self._trace) for r in self._view_ranks]
            for view in self._views:
                for name in view.needs:
                    if name not in self._store:
                        spec, leaves = self._specs[name]
                        self._store[name] = ([_empty_like_meta(x, self.device) for x in leaves], spec)
        self._shape_key = key

    def prepare(self, height: int, width: int, batch: int | None = None, **denoiser_call_overrides: Any) -> None:
        """Do the set-up work for a resolution up front (trace, buffers), so the first real call starts fast.
        CUDA graphs are captured on the first call of each shape."""
        from ...models import example_inputs

        param = self.device, self.dtype
        batch = batch or 2
        args, kwargs = example_inputs(
            self.denoiser, height, width, batch, param[1], param[0], self.pipe, **denoiser_call_overrides
        )
        self._prepare_shape(self._timestep_arg.bind(args, kwargs))

    def _placeholder(self, name: str) -> Any:
        """Output of a block whose value this rank never reads: right shapes for the glue, zeros."""
        if name not in self._placeholders:
            from torch.utils import _pytree as pytree

            spec, leaves = self._specs[name]
            real = [_empty_like_meta(x, self.device) for x in leaves]
            for x in real:
                if isinstance(x, torch.Tensor):
                    x.zero_()
            self._placeholders[name] = pytree.tree_unflatten(real, spec)
        return self._placeholders[name]

    # ------------------------------------------------------------------------------------------ pipeline call
    def _before_call(self, kwargs: dict) -> dict:
        check_scheduler(self.pipe.scheduler)
        for option in MULTI_CALL_OPTIONS:
            if kwargs.get(option):
                raise ConfigError(
                    f"{option}={kwargs[option]!r} calls the denoiser more than once per step, which asynchronous "
                    "denoising cannot schedule: leave it unset"
                )
        _check_not_offloaded(self.denoiser)
        param = next(self.denoiser.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            raise ConfigError(
                f"the denoiser moved from {self.device}/{self.dtype} to {param.device}/{param.dtype} after AsyncDiff "
                "was attached: call ad.remove(), move the pipeline, then attach again"
            )
        self.reset_state()
        self.timeline.clear()
        self._call_steps = kwargs.get("num_inference_steps", self._default_steps)
        accepts = self._call_params
        if self.world_size > 1:
            if "generator" in accepts and kwargs.get("generator") is None and kwargs.get("latents") is None:
                # every rank must start from the same noise: rank 0 draws the seed
                seed = self.transport.broadcast_object(random.randrange(2**63) if self.rank == 0 else None, src=0)
                kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
            if self.rank != 0 and "output_type" in accepts:
                kwargs["output_type"] = "latent"  # only rank 0 decodes (documented)
            if self.rank != 0 and hasattr(self.pipe, "set_progress_bar_config"):
                self._saved_progress = dict(getattr(self.pipe, "_progress_bar_config", {}))
                self.pipe.set_progress_bar_config(**{**self._saved_progress, "disable": True})
        return kwargs

    def _after_call(self, ok: bool) -> None:
        if ok:  # a transport that released a dead peer's wait only says so at its next call: ask it now
            self.transport.synchronize()
            self._check_passed_timesteps()
        if self._saved_progress is not None:
            self.pipe._progress_bar_config = self._saved_progress
            self._saved_progress = None
        self._fresh = {}
        self._state.pending_eps = self._state.template = None

    # ------------------------------------------------------------------------------------------ forwards
    def _block_forward(self, name: str, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            view = self._view
            if view is None or name in view.owned:
                out = original(*args, **kwargs)
                if name in self._recording:
                    self._fresh[name] = snapshot(out)
                    if self._sequential:
                        self._send_now(name)
                return out
            if self._sequential:
                return self._receive_now(name)
            stored = self._store.get(name)
            return fresh_copy(*stored) if stored is not None else self._placeholder(name)

        return forward

    def _send_now(self, name: str) -> None:
        """Sequential warm-up: hand a fresh owned output to the ranks that read it, as soon as it exists."""
        leaves = [x for x in self._fresh[name][0] if isinstance(x, torch.Tensor)]
        sends = {p: leaves for p, blocks in self._views[0].send_to.items() if name in blocks}
        self.transport.exchange(self._state.k - 1, sends, {})

    def _receive_now(self, name: str) -> Any:
        """Sequential warm-up: a block another rank owns; its fresh output arrives from the owner (if read)."""
        if name not in self._views[0].needs:
            return self._placeholder(name)
        leaves, spec = self._store[name]  # lands in the static buffer the first round replays
        owner = self._owner[name]  # rank r < n owns segment r
        self.transport.exchange(self._state.k - 1, {}, {owner: [x for x in leaves if isinstance(x, torch.Tensor)]})
        return fresh_copy(leaves, spec)

    def _denoiser_forward(self, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            st = self._state
            k = st.k
            st.k += 1
            bound = self._timestep_arg.bind(args, kwargs)
            if k == 0:
                self._begin_loop(bound)
                self._prepare_shape(bound)
            self._check_step(k, bound)
            step = st.schedule[k]
            if step.kind == EXACT:
                return self._exact_step(k, original, args, kwargs)
            if step.kind == REUSE:
                eps, st.pending_eps = st.pending_eps, None
                return replace_first_tensor(st.template, eps)
            return self._round(step, original, bound)

        return forward

    def _begin_loop(self, bound: Any) -> None:
        st = self._state
        st.tau = loop_timesteps(self.pipe.scheduler)
        st.tau_host = [float(x) for x in st.tau.detach().cpu()]  # one read per call, before the loop
        sample = next(iter(bound.arguments.values()))
        st.tau = st.tau.to(sample.device)  # substituted into denoiser calls: no copy from host memory per step
        warm_up = effective_warm_up(self.warm_up, self._call_steps, len(st.tau))
        st.schedule = make_schedule(len(st.tau), self.model_n, self.stride, warm_up, self.time_shift, self.stride_eps)
        st.warm_up = warm_up
        passed, first = TimestepArg.value(bound), st.tau_host[0]
        st.scale = passed / first if first != 0 else 1.0
        st.batch = sample.shape[0]
        if self.world_size > 1:
            digests = self.transport.all_gather_object(_digest(sample))
            if len(set(digests)) > 1:
                raise ConfigError(
                    "ranks start from different latents: pass the same generator seed (or none) on every rank"
                )

    def _check_step(self, k: int, bound: Any) -> None:
        st = self._state
        if k >= len(st.tau):
            raise DenoiserError(
                f"the denoiser was called {k + 1} times but the scheduler has {len(st.tau)} timesteps: the pipeline "
                "calls it more than once per step, which asynchronous denoising cannot schedule"
            )
        t = bound.arguments["timestep"]
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            st.passed_timesteps.append((k, t.detach().reshape(-1)[0]))  # checked after the loop
        else:
            self._check_timestep(k, TimestepArg.value(bound))
        sample = next(iter(bound.arguments.values()))
        if sample.shape[0] != st.batch:
            raise ConfigError(
                f"step {k}: the batch changed from {st.batch} to {sample.shape[0]} mid-run (a callback that turns "
                "CFG off?); asynchronous denoising keeps per-step state of the batch: keep it fixed"
            )
        if self.debug and self.world_size > 1:
            digests = self.transport.all_gather_object(_digest(sample))
            if len(set(digests)) > 1:
                raise RuntimeError(f"debug: latents differ across ranks at step {k}: {digests}")

    def _check_timestep(self, k: int, passed: float) -> None:
        expected = self._state.scale * self._state.tau_host[k]
        if abs(passed - expected) > 1e-3 * max(1.0, abs(expected)):
            raise DenoiserError(
                f"step {k}: the denoiser got timestep {passed:g} but the scheduler's τ[{k}] is {expected:g}; the "
                "pipeline calls the denoiser more than once per step or not in timestep order (e.g. Heun/DPM2 "
                "schedulers, skip_guidance_layers), which asynchronous denoising cannot schedule"
            )

    def _check_passed_timesteps(self) -> None:
        """Note [no host sync]: reading a GPU timestep to check it would stall the host every step (the GPU then
        idles while Python prepares the next one: 3% of an SD1.5 step on an H100), so GPU timesteps are
        collected during the loop and checked here, with one read, before the call returns."""
        passed, self._state.passed_timesteps = self._state.passed_timesteps, []
        if passed:
            values = torch.stack([t.float() for _, t in passed]).cpu().tolist()
            for (k, _), value in zip(passed, values):
                self._check_timestep(k, value)

    def _run(self, original: Any, view: _View | None, recording: frozenset, args: tuple, kwargs: dict) -> Any:
        """One forward of the denoiser as `view` sees it, replayed from a CUDA graph where possible."""
        self._view, self._recording, self._fresh = view, recording, {}
        if self._compile:
            if self._compiled is None:
                self._compiled = torch.compile(original, dynamic=False)
            original = self._compiled
        try:
            if not self._use_graphs:
                return original(*args, **kwargs)
            from ...runtime.executor import CapturedCall, signature_of

            key = (view.rank if view is not None else None, recording, signature_of((args, kwargs)))
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    if self._graph_pool is None:
                        self._graph_pool = torch.cuda.graph_pool_handle()
                    graph = CapturedCall(original, args, kwargs, pool=self._graph_pool)
                    graph.fresh = self._fresh
                except Exception as err:  # noqa: BLE001 - eager is always correct
                    log.warning("asyncdiff_rt: CUDA graph capture failed, running eagerly: %s", err)
                    self._use_graphs = False
                    self._fresh = {}
                    return original(*args, **kwargs)
                self._graphs[key] = graph
            out = graph(args, kwargs)
            self._fresh = graph.fresh
            return out
        finally:
            self._view, self._recording = None, frozenset()

    def _exact_step(self, k: int, original: Any, args: tuple, kwargs: dict) -> Any:
        """Warm-up: the whole denoiser, exactly. With all weights here every rank computes it all; with dropped
        weights it runs as a sequential pipeline across ranks, each owner handing its fresh outputs on. Either
        way the block outputs of the last warm-up step seed the first asynchronous round."""
        last_warm_up = k == self._state.warm_up - 1 and k + 1 < len(self._state.tau)
        with self.timeline.span("warm-up", k):
            out = self._warm_up_forward(original, last_warm_up, args, kwargs)
        eps = first_tensor(out).clone()  # the pipeline keeps ε (multistep schedulers): never hand out a buffer
        with self.timeline.span("ε", k, "comm"):
            self.transport.broadcast(eps, src=self.model_n - 1, step=k)
        return replace_first_tensor(out, eps)

    def _warm_up_forward(self, original: Any, last_warm_up: bool, args: tuple, kwargs: dict) -> Any:
        if self.dropped_bytes:
            self._view, self._recording, self._sequential, self._fresh = (
                self._views[0],
                frozenset(self._views[0].sends),
                True,
                {},
            )
            try:
                out = original(*args, **kwargs)
            finally:
                self._view, self._recording, self._sequential = None, frozenset(), False
        else:
            out = self._run(original, None, frozenset(self._store) if last_warm_up else frozenset(), args, kwargs)
            if last_warm_up:
                self._keep(self._fresh)
        return out

    def _keep(self, fresh: dict[str, tuple[list[Any], Any]]) -> None:
        """Copy outputs into the static store (Note [static buffers]): graphs read the store by address."""
        for name, (leaves, _) in fresh.items():
            if name in self._store:
                for dst, src in zip(self._store[name][0], leaves):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src)

    def _round(self, step: Step, original: Any, bound: Any) -> Any:
        st = self._state
        outs: dict[int, Any] = {}
        fresh: dict[str, tuple[list[Any], Any]] = {}
        tau = st.tau if isinstance(bound.arguments["timestep"], torch.Tensor) else st.tau_host  # no host sync
        for view in self._views:
            args, kwargs = TimestepArg.substitute(bound, tau[step.t_index[view.rank]])
            recording = frozenset(view.sends) if view.rank < self.model_n else frozenset()
            lane = "compute" if len(self._views) == 1 else f"view {view.rank}"
            with self.timeline.span("compute", step.k, lane):
                out = self._run(original, view, recording, args, kwargs)
            outs[view.rank] = out if len(self._views) == 1 else _clone_first(out)  # a graph's output is reused
            fresh.update(self._fresh)
        if self.transport_name == "local":
            self._keep(fresh)
            mine = first_tensor(outs[step.eps_rank])
            eps = mine.clone()
            out = outs[step.eps_rank]
            if step.next_eps_rank >= 0:
                st.pending_eps = first_tensor(outs[step.next_eps_rank]).clone()
        else:
            self._fresh = fresh
            with self.timeline.span("exchange", step.k, "comm"):
                self._exchange(step.k)
            out = outs[self.rank]
            mine = first_tensor(out)
            eps = mine.clone()  # the broadcast overwrites it; the pipeline keeps it
            with self.timeline.span("ε", step.k, "comm"):
                self.transport.broadcast(eps, src=step.eps_rank, step=step.k)
            if step.next_eps_rank >= 0:
                nxt = mine.clone() if self.rank == step.next_eps_rank else torch.empty_like(eps)
                self.transport.broadcast(nxt, src=step.next_eps_rank, step=step.k)
                st.pending_eps = nxt
        if self.stride == 2 and st.pending_eps is None and step.k + 1 < len(st.tau):
            st.pending_eps = eps.clone()
        out = replace_first_tensor(out, eps)
        if self.stride == 2:
            st.template = out
        return out

    def _exchange(self, k: int) -> None:
        """Owned outputs to the ranks that read them; theirs into the static store, in place (the forward that
        read the store has been issued before: the transport orders the receive after it)."""
        view = self._views[0]
        sends = {
            peer: [x for b in blocks for x in self._fresh[b][0] if isinstance(x, torch.Tensor)]
            for peer, blocks in view.send_to.items()
        }
        recvs = {
            peer: [x for b in blocks for x in self._store[b][0] if isinstance(x, torch.Tensor)]
            for peer, blocks in view.recv_from.items()
        }
        self.transport.exchange(k, sends, recvs)


def _with_parts(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser and, for a composite (ControlNet + UNet), its parts: weights freed there stay freed."""
    return [denoiser, *(getattr(denoiser, p) for p in getattr(denoiser, "composite_parts", ()))]


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_not_offloaded(denoiser: torch.nn.Module) -> None:
    if any(hasattr(m, "_hf_hook") for m in denoiser.modules()):
        raise ConfigError(
            "the denoiser has accelerate offload hooks (enable_model_cpu_offload / sequential offload / device_map): "
            "asyncdiff_rt keeps each rank's blocks on its GPU; load the pipeline without offloading"
        )


def _trace_twin(twin: torch.nn.Module, blocks: list[str], bound: Any) -> tuple[Any, dict]:
    """Data flow and each block's output layout (tree spec + meta leaves) for this call signature."""
    from torch.utils import _pytree as pytree

    from ...compiler.trace import trace_denoiser

    specs: dict[str, tuple[Any, list[Any]]] = {}
    modules = dict(twin.named_modules())
    handles = []
    for name in blocks:

        def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
            if name in specs:
                raise ConfigError(f"block {name!r} runs more than once per denoiser call: list its parts instead")
            leaves, spec = pytree.tree_flatten(out)
            specs[name] = (spec, leaves)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        meta_args, meta_kwargs = pytree.tree_map(_to_meta, (bound.args, bound.kwargs))
        trace = trace_denoiser(twin, meta_args, meta_kwargs, blocks)
    finally:
        for h in handles:
            h.remove()
    return trace, specs


def _clone_first(out: Any) -> Any:
    return replace_first_tensor(out, first_tensor(out).clone())


def _meta_twin(denoiser: torch.nn.Module) -> torch.nn.Module:
    from ...compiler.trace import meta_twin

    return meta_twin(denoiser)


def _empty_like_meta(x: Any, device: torch.device) -> Any:
    return torch.empty(x.shape, dtype=x.dtype, device=device) if isinstance(x, torch.Tensor) else x


def _to_meta(x: Any) -> Any:
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x


def _signature(arguments: dict) -> Any:
    """The tensor shapes a denoiser call passes, by argument path: what its trace and buffers depend on."""
    from torch.utils import _pytree as pytree

    flat, _ = pytree.tree_flatten_with_path(arguments)
    return tuple((pytree.keystr(path), tuple(x.shape), x.dtype) for path, x in flat if isinstance(x, torch.Tensor))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ += ["TransportError"]
