"""`AsyncDiff`: asynchronous denoising attached to an unchanged diffusers pipeline (docs/strategies.md).

This class only composes: the argument checks and the plan are its own; ranks, transport, agreement and the
per-call guards are the session's (runtime/session.py); the loop checks are runtime/guards.py's; forwards run
through the executor (runtime/executor.py) and read other segments' outputs from the static store
(runtime/buffers.py); what each rank does at each step is the stepper's (stepper.py, Note [step ordering]).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

from ... import __version__
from ...compiler.plan import Plan
from ...errors import ConfigError, DenoiserError, PlanError, TransportError
from ...models import adapter_for
from ...models.controlnet import attach_controlnet
from ...models.denoiser import (
    TimestepArg,
    check_scheduler,
    class_forward,
    effective_warm_up,
    find_denoiser,
    loop_timesteps,
)
from ...runtime.buffers import BlockStore
from ...runtime.executor import Executor
from ...runtime.guards import LoopGuard
from ...runtime.hooks import CallHook, ForwardOverrides
from ...runtime.session import Session
from ...runtime.timeline import Timeline
from ..cfg import CfgSplit, uses_true_cfg
from .schedule import Step, make_schedule
from .stepper import SegmentStepper
from .weights import DROPPED_HELP, drop_weights, was_dropped

__all__ = ["AsyncDiff", "ConfigError", "TransportError"]

log = logging.getLogger("asyncdiff_rt")

# options that make the pipeline call the denoiser more than once per step
MULTI_CALL_OPTIONS = ("skip_guidance_layers",)
DEFAULT_MODEL_N = 2  # the reference's default


class AsyncDiff:
    """Asynchronous denoising for a diffusers pipeline; every rank constructs it and calls the pipeline.

    Args:
        pipeline: a diffusers pipeline with `unet` or `transformer`.
        model_n: number of segments (GPUs); `world_size == model_n + stride - 1`. Default: the plan's segment
            count when a plan is given, else 2; an explicit value that disagrees with the plan is refused.
        stride: 1 or 2 (stride 2: pairs of steps per compute round, one more rank).
        warm_up: exact steps before the asynchronous ones (>= 1; >= the step count runs exactly).
        time_shift: compute step k with τ[k-1] (the reference's option).
        plan: explicit partition (list of segments of module names, a saved plan file, or a Plan); default: planned.
        transport: "auto", "nccl", "ipc", "shm", "gloo" or "local" (one process runs every segment).
        group: a torch.distributed sub-group to run in (e.g. 8 GPUs as 2 x model_n=4).
        stride_eps: stride 2 only: "reuse" (ε_{k+1} = ε_k, as the reference) or "fresh".
        timeout_s: every wait on a peer raises after this many seconds.
        debug: check after each step that the latents agree across ranks (also ASYNCDIFF_RT_DEBUG=1).
        drop_weights: free the weights of blocks other ranks own (default: when running one process per rank);
            warm-up then runs as a sequential pipeline across ranks. The pipeline keeps only this rank's blocks,
            also after `remove()`, so it cannot run alone again: load it again for that.
        height, width: the resolution to plan for when no plan is given (default: the pipeline's default).
        graphs: replay each rank's forward as a CUDA graph (default: on CUDA); eager fallback, logged.
        controlnet: ControlNet pipelines: "blocks" (the ControlNet's blocks are cut into segments with the UNet's
            and follow the stale rule), "replicated" (every rank runs the whole ControlNet each step; its residuals
            are fresh inputs), or "auto" (default: "blocks" for one ControlNetModel — measured cheaper, see
            benchmarks/README.md — "replicated" for several). Ignored for pipelines without a ControlNet.
        compile: torch.compile each rank's whole forward (owned blocks, replays and glue as one region) before
            capturing it; the first call then takes the compile time (call `prepare` first).
        cfg_parallel: split the classifier-free-guidance batch across two halves of the ranks (world = 2 x
            (model_n + stride - 1); with transport="local", 2 processes each running every segment): exact, and the
            halves' segment traffic stays inside each half (strategies/cfg.py). Calls need guidance_scale > 1.
    """

    def __init__(
        self,
        pipeline: Any,
        model_n: int | None = None,
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
        cfg_parallel: bool = False,
    ):
        if getattr(type(pipeline), "_asyncdiff_rt_hooked", False):
            raise ConfigError("this pipeline already has an AsyncDiff attached: call .remove() on it first")
        if getattr(type(pipeline), "_asyncdiff_rt_dropped_guard", False):
            raise ConfigError(f"this pipeline's denoiser lost weights to an earlier AsyncDiff: {DROPPED_HELP}")
        self._controlnet = attach_controlnet(pipeline, controlnet, ConfigError)
        try:
            self._setup(
                pipeline, model_n, stride, warm_up, time_shift, plan, transport, group, stride_eps, timeout_s, debug,
                drop_weights, height, width, graphs, compile, cfg_parallel,
            )  # fmt: skip
        except BaseException:
            if self._controlnet is not None:
                self._controlnet.remove()
            raise

    def _setup(
        self, pipeline, model_n, stride, warm_up, time_shift, plan, transport, group, stride_eps, timeout_s, debug,
        drop_weights_, height, width, graphs, compile, cfg_parallel,
    ) -> None:  # fmt: skip
        # ---- arguments: every check here runs before any communication or denoiser work (docs/architecture.md)
        if plan is not None and not isinstance(plan, Plan):
            plan = Plan.from_spec(plan)
        if plan is not None and model_n is not None and model_n != plan.model_n:
            raise ConfigError(
                f"model_n={model_n} but the plan has {plan.model_n} segments: pass model_n={plan.model_n} or leave "
                "it out (the plan decides)"
            )
        if model_n is None:
            model_n = plan.model_n if plan is not None else DEFAULT_MODEL_N
        if not isinstance(model_n, int) or isinstance(model_n, bool) or model_n < 1:
            raise ConfigError(f"model_n must be an integer >= 1, got {model_n!r}")
        if stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2, got {stride!r}")
        _check_warm_up(warm_up)
        if stride_eps not in ("reuse", "fresh"):
            raise ConfigError(f"stride_eps must be 'reuse' or 'fresh', got {stride_eps!r}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if not isinstance(cfg_parallel, bool):
            raise ConfigError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")

        self.pipe = pipeline
        self._height, self._width = height, width
        self.denoiser_attr, self.denoiser = find_denoiser(pipeline)
        if was_dropped(self.denoiser):
            raise ConfigError(f"this denoiser's weights were partly freed by an earlier AsyncDiff: {DROPPED_HELP}")
        check_scheduler(pipeline.scheduler)
        _check_not_offloaded(self.denoiser)
        param = next(self.denoiser.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.adapter = adapter_for(self.denoiser)

        self.model_n, self.stride, self.warm_up, self.time_shift = model_n, stride, warm_up, time_shift
        self.stride_eps, self.timeout_s = stride_eps, timeout_s
        self.debug = bool(int(os.environ.get("ASYNCDIFF_RT_DEBUG", "0"))) if debug is None else debug
        self.world_needed = model_n + stride - 1

        from ...compiler.blocks import candidate_blocks

        if plan is not None:
            plan.validate(self.denoiser)  # unknown modules, duplicates, module + parent: before any communication
        else:
            n_blocks = len(candidate_blocks(self.denoiser))
            if model_n > n_blocks:
                raise ConfigError(
                    f"model_n={model_n} is larger than the {n_blocks} blocks {type(self.denoiser).__name__} can be "
                    f"cut into: use model_n <= {n_blocks}"
                )

        # ---- ranks, then the plan: rank 0 decides and broadcasts; every rank checks hash, dtype and device type
        config = (model_n, stride, warm_up, time_shift, stride_eps, cfg_parallel)
        self.session = Session(
            pipeline, self.device, self.world_needed, transport, group, timeout_s,
            f"model_n={model_n}, stride={stride}", "model_n + stride - 1", cfg_parallel,
            {"the configuration (model_n, stride, warm_up, time_shift, stride_eps, cfg_parallel)": config},
        )  # fmt: skip
        self.transport, self.transport_name = self.session.transport, self.session.transport_name
        self.rank, self.world_size = self.session.rank, self.session.world_size  # within this guidance half
        self.cfg = (
            CfgSplit(self.adapter, self.session.half, self.session.partner, self.session.world, model_n)
            if cfg_parallel
            else None
        )
        try:
            if plan is None and model_n == 1:
                plan = Plan.from_spec([candidate_blocks(self.denoiser)])  # one segment: nothing to balance
            if plan is None:
                plan = Plan.from_json(self.session.decide_on_rank0(self._plan_on_rank0, "plan the partition"))
                plan.validate(self.denoiser)
            self.session.agree(
                {
                    "plan": plan.hash(),
                    "dtype": str(self.dtype),
                    "device": self.device.type,
                    "config": config,
                    "version": __version__,
                }
            )
        except (ConfigError, PlanError, DenoiserError):
            self.session.close()
            raise
        self.plan = plan

        # ---- weights, buffers, the stepper; hooks last: nothing is installed if anything above raised
        if drop_weights_ is None:
            drop_weights_ = self.world_size > 1
        self.dropped_bytes = 0
        self.timeline = Timeline(self.device)
        self.executor = Executor(self.device, graphs, compile)
        self.stepper = SegmentStepper(
            plan, stride, self.rank, self.session.rank_views, self.transport, self.executor,
            BlockStore(self.device), self.timeline, _meta_twin(self.denoiser) if model_n > 1 else None,
            sequential_warm_up=False, adapter=self.adapter,
        )  # fmt: skip
        if drop_weights_ and self.world_size > 1:
            self.dropped_bytes = drop_weights(self.denoiser, plan.blocks, self.stepper.views[0].owned)
            self.stepper.sequential_warm_up = self.dropped_bytes > 0
        self._timestep_arg = TimestepArg(class_forward(self.denoiser))
        gathers = self.session.world if self.session.distributed else None
        self.guard = LoopGuard(gathers, self.debug, self.adapter.timestep_divisor)
        self._k = 0
        self._overrides = ForwardOverrides()
        modules = dict(self.denoiser.named_modules())
        for name in plan.blocks if self.world_needed > 1 else ():  # one segment: nothing to replay or send
            self._overrides.install(modules[name], lambda orig, name=name: self.stepper.block_forward(name, orig))
        self._overrides.install(self.denoiser, self._denoiser_forward)
        steps_param = inspect.signature(type(pipeline).__call__).parameters.get("num_inference_steps")
        self._default_steps = steps_param.default if steps_param is not None else None
        self._call_steps: Any = None
        self.session.install(self._before_call, self._after_call)

    # ------------------------------------------------------------------------------------------ public API
    def reset_state(self, warm_up: int | None = None) -> None:
        """Forget the current call's state; optionally set a new warm-up (the reference's API). State also
        resets by itself at the start of every pipeline call."""
        if warm_up is not None:
            _check_warm_up(warm_up)
            self.warm_up = warm_up
        self._k = 0
        self.stepper.reset()

    def record_timeline(self, enabled: bool = True) -> None:
        """Record compute and communication spans of the following pipeline calls (runtime/timeline.py)."""
        self.timeline.enabled = enabled
        self.timeline.clear()

    def gather_timeline(self) -> list[list[dict[str, Any]]]:
        """Every rank's spans of the last recorded call, in rank order (a collective: call it on every rank)."""
        return self.session.world.all_gather_object(self.timeline.intervals(), phase="timeline gather")

    def schedule(self, num_steps: int) -> list[Step]:
        return make_schedule(num_steps, self.model_n, self.stride, self.warm_up, self.time_shift, self.stride_eps)

    def parameter_bytes(self) -> int:
        """Bytes of denoiser weights this rank holds (own blocks + replicated modules)."""
        tensors = list(self.denoiser.parameters()) + list(self.denoiser.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (after `prepare`, a call of the prepared size captures none)."""
        return self.executor.captures

    def prepare(self, height: int | None = None, width: int | None = None, batch: int = 1, **call_kwargs: Any) -> None:
        """Do a call's set-up work up front: trace, buffers, CUDA-graph capture and compilation for `height` x
        `width` and `batch` images per prompt, by running the pipeline once for a few steps (warm-up + 2, latent
        output, discarded). Pass the keyword arguments your real calls will pass (the graphs are specialised on
        the denoiser call's signature); the first real call of that size then captures nothing new."""
        params = inspect.signature(type(self.pipe).__call__).parameters
        kwargs = dict(call_kwargs)
        for key, value in (("height", height), ("width", width), ("num_images_per_prompt", batch)):
            if key in params and value is not None:
                kwargs.setdefault(key, value)
        if "prompt" in params and kwargs.get("prompt") is None and kwargs.get("prompt_embeds") is None:
            kwargs["prompt"] = ""
        kwargs["num_inference_steps"] = self.warm_up + 2 * self.stride
        if "output_type" in params:
            kwargs["output_type"] = "latent"
        self.pipe(**kwargs)

    def remove(self) -> None:
        """Take the hooks out. Without dropped weights the pipeline is plain diffusers again; with them (the
        default on several processes) it holds only this rank's blocks, and its next call raises a clear error."""
        self._overrides.remove()
        self.session.close()
        if self._controlnet is not None:
            self._controlnet.remove()
        if self.dropped_bytes:
            _guard_dropped(self.pipe)

    # ------------------------------------------------------------------------------------------ set-up
    def _plan_on_rank0(self) -> str:
        from ...compiler.planning import plan_for

        plan = plan_for(
            self.pipe,
            self.model_n,
            height=self._height,  # None: the pipeline's default size (the model adapter's default_resolution)
            width=self._width,
            repeats=20 if self.device.type == "cuda" else 3,  # CPU timings are coarse anyway
            batch=self.adapter.default_batch(self.pipe) // 2
            if self.cfg is not None and self.adapter.guidance_in_batch
            else None,
            controlnet="replicated",  # install nothing more: a ControlNet listed as blocks is installed already
        )
        return plan.to_json()

    # ------------------------------------------------------------------------------------------ pipeline call
    def _before_call(self, kwargs: dict) -> dict:
        check_scheduler(self.pipe.scheduler)
        for option in MULTI_CALL_OPTIONS:
            if kwargs.get(option):
                raise ConfigError(
                    f"{option}={kwargs[option]!r} calls the denoiser more than once per step, which asynchronous "
                    "denoising cannot schedule: leave it unset"
                )
        if uses_true_cfg(kwargs) and self.cfg is None:
            raise ConfigError(
                "true_cfg_scale > 1 with a negative prompt calls the transformer twice per step (FLUX true CFG), "
                "which the segments strategy cannot schedule: leave true_cfg_scale at 1, or split the two calls "
                "over two processes with model_n=1, cfg_parallel=True"
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
        self.guard.begin_call(kwargs, self._default_steps)
        if self.cfg is not None:
            self.cfg.check_call(self.pipe, kwargs)
        return kwargs

    def _after_call(self, ok: bool) -> None:
        if ok:  # a transport that released a dead peer's wait only says so at its next call: ask it now
            self.transport.synchronize()
            if self.session.world is not self.transport:
                self.session.world.synchronize()
            self.guard.finish()
        self.stepper.reset()

    def _sample(self, bound: Any) -> torch.Tensor:
        arguments = bound.arguments
        return arguments.get(self.adapter.sample_arg, next(iter(arguments.values())))

    def _begin_loop(self, bound: Any, split: Any) -> None:
        """`bound`: the pipeline's call, checked for agreement; `split`: what this rank computes from."""
        sample = self._sample(bound)
        tau = loop_timesteps(self.pipe.scheduler)
        tau_host = [float(x) for x in tau.detach().cpu()]  # one read per call, before the loop
        self.guard.begin_loop(tau_host, bound, sample)
        bound = split
        st = self.stepper
        st.tau, st.tau_values = tau.to(sample.device), tau_host  # substituted per step: no host copy then
        st.warm_up = effective_warm_up(self.warm_up, self._call_steps, len(tau_host))
        st.schedule = make_schedule(
            len(tau_host), self.model_n, self.stride, st.warm_up, self.time_shift, self.stride_eps
        )
        st.prepare_shape(bound.args, bound.kwargs)

    def _denoiser_forward(self, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.cfg is not None and self.cfg.pairs:
                return self._true_cfg_call(original, args, kwargs)
            k = self._k
            self._k += 1
            full = self._timestep_arg.bind(args, kwargs)
            bound = full
            if self.cfg is not None:
                args, kwargs = self.cfg.split(self.pipe, full, self._sample(full))
                bound = self._timestep_arg.bind(args, kwargs)
            if k == 0:
                self._begin_loop(full, bound)
            self.guard.check_step(k, full, self._sample(full))
            out = self.stepper.step(k, original, bound, args, kwargs)
            return self.cfg.join(out, k) if self.cfg is not None else out

        return forward

    def _true_cfg_call(self, original: Any, args: tuple, kwargs: dict) -> Any:
        """Call 2k (prompt) or 2k + 1 (negative) of FLUX's true CFG: one of them is this half's step k."""
        call = self._k
        self._k += 1
        bound = self._timestep_arg.bind(args, kwargs)
        sample = self._sample(bound)
        if call == 0:
            self._begin_loop(bound, bound)
        self.guard.check_step(call // 2, bound, sample)
        out = self.stepper.step(call // 2, original, bound, args, kwargs) if self.cfg.computes(call) else None
        return self.cfg.pair(out, call, sample, bound.arguments.get("return_dict", True))


def _check_warm_up(warm_up: Any) -> None:
    if not isinstance(warm_up, int) or isinstance(warm_up, bool) or warm_up < 1:
        raise ConfigError(
            f"warm_up must be an integer >= 1, got {warm_up!r}: the first step must be exact "
            "(warm_up >= the number of steps runs the whole loop exactly)"
        )


def _check_not_offloaded(denoiser: torch.nn.Module) -> None:
    if any(hasattr(m, "_hf_hook") for m in denoiser.modules()):
        raise ConfigError(
            "the denoiser has accelerate offload hooks (enable_model_cpu_offload / sequential offload / device_map): "
            "asyncdiff_rt keeps each rank's blocks on its GPU; load the pipeline without offloading"
        )


def _guard_dropped(pipe: Any) -> None:
    """After `remove()` with dropped weights: the next call raises instead of failing deep inside torch."""

    def refuse(_kwargs: dict) -> dict:
        raise ConfigError(
            "this pipeline's denoiser holds only one rank's blocks (AsyncDiff freed the others: drop_weights=True, "
            f"the default on several processes), so it cannot run alone after remove(): {DROPPED_HELP}"
        )

    CallHook(pipe, refuse, lambda ok: None, flag="_asyncdiff_rt_dropped_guard")


def _meta_twin(denoiser: torch.nn.Module) -> torch.nn.Module:
    from ...compiler.trace import meta_twin

    return meta_twin(denoiser)
