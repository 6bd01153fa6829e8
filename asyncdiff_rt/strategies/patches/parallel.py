"""`PatchParallel`: displaced patch parallelism (DistriFusion, DESIGN §10) attached to an unchanged pipeline.

This class only composes: its checks are checks.py's; ranks, transport, agreement and the per-call guards are
the session's (runtime/session.py); the loop checks are runtime/guards.py's; what each layer computes on this
rank's rows is layers.py's, and what it exchanges, when, in which buffers, is exchange.py's, following the sync
mode's table (modes.py); which steady-state forwards replay from CUDA graphs is graphs.py's (Note [patch
graphs]). The guidance halves, with cfg_parallel, are strategies/cfg.py's.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

from ... import __version__
from ...errors import ConfigError, DenoiserError
from ...models import adapter_for
from ...models.denoiser import (
    TimestepArg,
    check_scheduler,
    class_forward,
    effective_warm_up,
    first_tensor,
    loop_timesteps,
    replace_first_tensor,
)
from ...runtime.guards import LoopGuard, digest
from ...runtime.hooks import ForwardOverrides
from ...runtime.session import Session, dist_ready
from ...runtime.timeline import Timeline
from ...transport.windows import puts_supported, puts_wanted
from ..cfg import CfgSplit
from .checks import check_controlnet, check_denoiser, check_rows, full_input_convs, row_factor, self_attentions
from .exchange import REGIONS, PatchExchange, kv_groups
from .graphs import PatchGraphs, graphs_allowed, overlap_enabled, tensor_timestep
from .layers import conv_in_forward, group_norm_forward, halo_conv_forward, self_attention_forward
from .modes import SYNC_MODES, StepPolicy
from .traffic import bytes_per_step

__all__ = ["PatchParallel", "SYNC_MODES"]

log = logging.getLogger("asyncdiff_rt")

MULTI_CALL_OPTIONS = ("skip_guidance_layers",)
# what a ControlNet hands the UNet: on each rank its own rows (Note [patch ControlNet])
CONTROLNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


class PatchParallel:
    """Displaced patch parallelism for a diffusers UNet pipeline; every rank constructs it and calls the pipeline.

    The world (the process group, or `group`) is P patches, 2P with `cfg_parallel`; rank p computes rows
    [pH/P, (p+1)H/P) of every feature map and every rank gets the whole ε each step.

    Args:
        pipe: a diffusers UNet2DConditionModel pipeline (SD 1.5/2.1, SDXL, SDXL inpainting, x4 upscaler).
        warm_up: exact steps before the stale ones (>= 1; >= the step count runs the whole loop exactly).
        sync_mode: how GroupNorm, halos and K/V follow after warm-up, one of `SYNC_MODES` (DESIGN §10).
        cfg_parallel: split the guidance batch over two halves of the ranks (world = 2P).
        transport: "auto", "gloo", "shm", "ipc" or "nccl"; group: a torch.distributed sub-group to run in.
        timeout_s: every wait on a peer raises TransportError after this many seconds.
        graphs: replay the steady-state forwards (k >= warm_up) from CUDA graphs (None: on CUDA; False: eager;
            a failed capture is logged and runs eagerly; graphs.py, Note [patch graphs]). `captures` counts them.
        compile: torch.compile (not yet: compile=True is refused).
        debug: check after each step that the latents agree on every rank (also ASYNCDIFF_RT_DEBUG=1).
        patches: if given, the number of patches the world must have (a check, not a choice).
    """

    def __init__(
        self,
        pipe: Any,
        warm_up: int = 5,
        sync_mode: str = "corrected_async_gn",
        cfg_parallel: bool = False,
        transport: str = "auto",
        group: Any = None,
        timeout_s: float = 60.0,
        graphs: bool | None = None,
        compile: bool = False,
        debug: bool | None = False,
        *,
        patches: int | None = None,
    ):
        # ---- arguments: every check here runs before any communication or denoiser work (DESIGN §6)
        if getattr(type(pipe), "_asyncdiff_rt_hooked", False):
            raise ConfigError("this pipeline already has a strategy attached: call .remove() on it first")
        _check_warm_up(warm_up)
        if sync_mode not in SYNC_MODES:
            raise ConfigError(f"unknown sync_mode {sync_mode!r}; choose one of {', '.join(SYNC_MODES)}")
        if not isinstance(cfg_parallel, bool):
            raise ConfigError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if compile:
            raise ConfigError("PatchParallel(compile=True) is not supported yet: leave compile=False")
        if transport == "local":
            raise ConfigError(
                "PatchParallel runs one process per patch; transport='local' is not supported: launch with "
                "`torchrun --nproc_per_node=P` and use 'auto', 'gloo', 'shm', 'ipc' or 'nccl'"
            )
        if patches is not None and (not isinstance(patches, int) or isinstance(patches, bool) or patches < 1):
            raise ConfigError(f"patches must be an integer >= 1, got {patches!r}")
        self.pipe = pipe
        self.denoiser = check_denoiser(pipe)
        self.controlnet = check_controlnet(pipe, cfg_parallel)  # split into the same rows (Note [patch ControlNet])
        check_scheduler(pipe.scheduler)
        param = next(self.denoiser.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.adapter = adapter_for(self.denoiser)
        self.factor = row_factor(self.denoiser)
        self.warm_up, self.sync_mode, self.timeout_s = warm_up, sync_mode, timeout_s
        self.debug = bool(int(os.environ.get("ASYNCDIFF_RT_DEBUG", "0"))) if debug is None else bool(debug)
        use_graphs = (self.device.type == "cuda" if graphs is None else bool(graphs)) and self.device.type == "cuda"
        use_graphs = use_graphs and graphs_allowed(sync_mode)
        self.kv_groups = kv_groups()  # the K/V transfer's groups: every rank must cut the same messages
        kv_puts = puts_wanted()  # and take the same K/V path (exchange.py, Note [K/V puts])

        # ---- ranks: the world is the patches (x2 with cfg_parallel); every rank agrees on the configuration
        world = _world_size(group)
        self.patches = patches if patches is not None else (world // 2 if cfg_parallel else world)
        config = (warm_up, sync_mode, cfg_parallel, patches)
        self.session = Session(
            pipe, self.device, self.patches, transport, group, timeout_s, f"PatchParallel(patches={self.patches})",
            "one process per patch", cfg_parallel,
            {"the configuration (warm_up, sync_mode, cfg_parallel, patches)": config},
        )  # fmt: skip
        try:
            self.session.agree(
                {
                    "dtype": str(self.dtype),
                    "device": self.device.type,
                    "config": config,
                    "denoiser": type(self.denoiser).__name__,
                    "controlnet": type(self.controlnet).__name__ if self.controlnet is not None else None,
                    "version": __version__,
                    "graphs": use_graphs,  # graphs with exchanges inside agree on their capture (graphs.py)
                    "kv_groups": self.kv_groups,
                    "kv_puts": kv_puts,
                }
            )
        except (ConfigError, DenoiserError):
            self.session.close()
            raise
        self.transport = self.session.transport
        self.kv_puts = kv_puts and puts_supported(self.transport, self.device)
        self.rank, self.world_size = self.session.rank, self.session.world_size  # within this guidance half
        self.cfg = (
            CfgSplit(self.adapter, self.session.half, self.session.partner, self.session.world)
            if cfg_parallel
            else None
        )

        # ---- per-rank state; hooks last: nothing is installed if anything above raised
        self.timeline = Timeline(self.device)
        self.exchange = self._new_exchange()
        self.graphs = PatchGraphs(self.device, graphs, self.transport, sync_mode)
        self._signature: Any = None
        self._out_bytes = 0
        self._call_steps: Any = None
        self._call_warm_up = warm_up
        self._timestep_arg = TimestepArg(class_forward(self.denoiser))
        self.guard = LoopGuard(
            self.session.world if self.session.distributed else None, self.debug, self.adapter.timestep_divisor
        )
        if self.controlnet is not None:  # each rank's residuals are its own rows: not part of the agreement
            self.guard.rank_local = frozenset(CONTROLNET_RESIDUALS)
        self._k = 0
        self._install_layers()
        steps_param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
        self._default_steps = steps_param.default if steps_param is not None else None
        self.session.install(self._before_call, self._after_call)

    def _install_layers(self) -> None:
        self._overrides = ForwardOverrides()
        ex = self.exchange_proxy
        models = [(self.denoiser, "")] + ([(self.controlnet, "controlnet.")] if self.controlnet is not None else [])
        for model, prefix in models:  # exchange points named apart: the ControlNet's and the UNet's in one step
            full = {id(c) for c in full_input_convs(model)}
            attentions = {id(m) for _, m in self_attentions(model)}
            for name, module in model.named_modules():
                name = prefix + name
                if id(module) in full:
                    make = lambda orig, m=module: conv_in_forward(ex, m, orig)  # noqa: E731
                elif isinstance(module, torch.nn.Conv2d) and (module.kernel_size[0] > 1 or module.stride[0] > 1):
                    make = lambda orig, n=name, m=module: halo_conv_forward(ex, n, m, orig)  # noqa: E731
                elif isinstance(module, torch.nn.GroupNorm):
                    make = lambda orig, n=name, m=module: group_norm_forward(ex, n, m, orig)  # noqa: E731
                elif id(module) in attentions:
                    make = lambda orig, n=name, m=module: self_attention_forward(ex, n, m, orig)  # noqa: E731
                else:
                    continue
                self._overrides.install(module, make)
        if self.controlnet is not None:
            self._overrides.install(self.controlnet, self._controlnet_forward)
        self._overrides.install(self.denoiser, self._denoiser_forward)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (0 on the eager path)."""
        return self.graphs.captures

    @property
    def exchange_proxy(self) -> _CurrentExchange:
        return _CurrentExchange(self)

    # ------------------------------------------------------------------------------------------ public API
    def reset_state(self, warm_up: int | None = None) -> None:
        """Forget the current call's state; optionally set a new warm-up. Also runs at every call's start."""
        if warm_up is not None:
            _check_warm_up(warm_up)
            self.warm_up = warm_up
        self._k = 0

    def record_timeline(self, enabled: bool = True) -> None:
        """Record compute and communication spans of the following pipeline calls (runtime/timeline.py)."""
        self.timeline.enabled = enabled
        self.timeline.clear()

    def gather_timeline(self) -> list[list[dict[str, Any]]]:
        """Every rank's spans of the last recorded call, in rank order (a collective: call it on every rank)."""
        return self.session.world.all_gather_object(self.timeline.intervals())

    def bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends per steady-state step (halo, kv, gn; "output": the ε rows gathered); "all_gather":
        what gathering every exchanged layer's whole input would send; "distrifusion": what distrifuser's all-gather
        of boundaries, K/V and moments sends (traffic.py, `distrifusion_bytes`). Known after a first call."""
        steady = StepPolicy(self.sync_mode, self.warm_up, self.warm_up)
        regions = steady.packed_regions + (("gn",) if self.sync_mode == "sync_gn" else ())  # sync_gn: fresh
        out = bytes_per_step(self.exchange, REGIONS if self.sync_mode == "full_sync" else regions)
        rows = self._out_bytes if self._signature is not None else 0
        out["output"] = rows * (self.world_size - 1)
        return out

    def remove(self) -> None:
        """Take the hooks out: the pipeline is plain diffusers again."""
        self._overrides.remove()
        self.exchange.retire()
        self.session.close()

    # ------------------------------------------------------------------------------------------ pipeline call
    def _before_call(self, kwargs: dict) -> dict:
        check_scheduler(self.pipe.scheduler)
        for option in MULTI_CALL_OPTIONS:
            if kwargs.get(option):
                raise ConfigError(f"{option}={kwargs[option]!r} calls the denoiser more than once per step")
        param = next(self.denoiser.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            raise ConfigError(
                f"the denoiser moved from {self.device}/{self.dtype} to {param.device}/{param.dtype} after "
                "PatchParallel was attached: call .remove(), move the pipeline, then attach again"
            )
        scale = getattr(self.pipe, "vae_scale_factor", None)
        if self.session.accepts("height") and scale:
            height = kwargs.get("height") or self.adapter.default_resolution(self.pipe)[0]
            check_rows(
                height // scale, self.patches, self.factor, f"height {height} (latent rows {height // scale})", scale
            )
        self.reset_state()
        self.timeline.clear()
        self.guard.begin_call(kwargs, self._default_steps)
        self._call_steps = kwargs.get("num_inference_steps", self._default_steps)
        if self.cfg is not None:
            self.cfg.check_call(self.pipe, kwargs)
        return kwargs

    def _after_call(self, ok: bool) -> None:
        if ok:
            self.transport.synchronize()
            self.guard.finish()
        self._k = 0

    def _sample(self, bound: Any) -> torch.Tensor:
        return bound.arguments.get(self.adapter.sample_arg, next(iter(bound.arguments.values())))

    def _begin_loop(self, full: Any, sample: torch.Tensor, bound: Any) -> None:
        # Before any of the denoiser computes, alike on every rank (the upscaler's rows are its input's).
        check_rows(sample.shape[-2], self.patches, self.factor, f"the latent height {sample.shape[-2]}")
        tau_host = [float(x) for x in loop_timesteps(self.pipe.scheduler).detach().cpu()]
        self.guard.begin_loop(tau_host, full, sample)
        if self.controlnet is None:  # else the ControlNet's call began the step (`_controlnet_forward`)
            self._new_signature(_shapes_of(bound.arguments), len(tau_host))

    def _new_signature(self, signature: tuple, steps: int) -> None:
        # warm_up >= the steps asked for runs exact, also where the scheduler calls the denoiser once more (PNDM)
        self._call_warm_up = effective_warm_up(self.warm_up, self._call_steps, steps)
        if signature != self._signature:  # new shapes: register the exchange points again at step 0
            self.exchange.retire()
            self.exchange = self._new_exchange()
            self.graphs.clear()  # their static slots were the old exchange's
            self._signature = signature

    def _new_exchange(self) -> PatchExchange:
        return PatchExchange(self.rank, self.world_size, self.transport, self.device, self.kv_groups, self.kv_puts)

    def _controlnet_forward(self, original: Any):
        """Note [patch ControlNet]: the pipeline calls the ControlNet on the full latent and image before the UNet
        at every step; its layers are split into this rank's rows like the UNet's (exchange points named
        `controlnet.*`, in the same step's exchange), so the residuals it hands the UNet are this rank's rows.
        It begins the step; it runs eagerly (the UNet's steady forwards replay from graphs)."""
        signature_of = inspect.signature(class_forward(self.controlnet))

        def forward(*args: Any, **kwargs: Any) -> Any:
            k = self._k
            if k == 0:
                bound = signature_of.bind(*args, **kwargs)
                sample = bound.arguments["sample"]
                check_rows(sample.shape[-2], self.patches, self.factor, f"the latent height {sample.shape[-2]}")
                self._new_signature(_shapes_of(bound.arguments), len(loop_timesteps(self.pipe.scheduler)))
                cond, scale = bound.arguments.get("controlnet_cond"), bound.arguments.get("conditioning_scale")
                self.guard.extra = {"the ControlNet image and scale": (digest(cond) if cond is not None else None,
                                                                       repr(scale))}  # fmt: skip
            self.exchange.begin_step(StepPolicy(self.sync_mode, self._call_warm_up, k))
            with self.timeline.span("warm-up" if self.exchange.policy.exact else "compute", k, "controlnet"):
                return original(*args, **kwargs)

        return forward

    def _denoiser_forward(self, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            k = self._k
            self._k += 1
            full = self._timestep_arg.bind(args, kwargs)
            sample = self._sample(full)
            bound = full
            if self.cfg is not None:
                args, kwargs = self.cfg.split(self.pipe, full, sample)
                bound = self._timestep_arg.bind(args, kwargs)
            if k == 0:
                self._begin_loop(full, sample, bound)
            self.guard.check_step(k, full, sample)
            ex = self.exchange
            ex.begin_step(StepPolicy(self.sync_mode, self._call_warm_up, k))
            # exact steps too, once the exchange points are registered (Note [patch graphs])
            replay = self.graphs.enabled and (k >= self._call_warm_up or (ex.frozen and overlap_enabled()))
            with self.timeline.span("warm-up" if ex.policy.exact else "compute", k):
                out = self._replayed(original, k, args, kwargs) if replay else original(*args, **kwargs)
            with self.timeline.span("exchange", k, "comm"):  # ε rows, and this step's values for step k+1
                own = first_tensor(out)
                self._out_bytes = own.numel() * own.element_size()
                rows = ex.end_step(own)
                if replay and rows is own:  # one patch: the graph's static output; the pipeline keeps ε
                    rows = own.clone()
                out = replace_first_tensor(out, rows)
            return self.cfg.join(out, k) if self.cfg is not None else out

        return forward

    def _replayed(self, original: Any, k: int, args: tuple, kwargs: dict) -> Any:
        """A forward through the graphs (graphs.py, Note [patch graphs]): keyed by the slots it writes and reads,
        never by the step (an exact step reads and writes slot k % 2 only); a Python-number timestep goes in as a
        tensor."""
        ex, policy = self.exchange, self.exchange.policy
        comm_inside = self.world_size > 1 and (policy.halo_source == "fresh" or policy.norm_rule == "exact")
        if policy.exact:
            key: tuple = ("patch", "exact", k % 2)
        else:
            key = ("patch", policy.sync_mode, k % 2 if policy.writes_own or comm_inside else None, ex.read_slot)
        bound = self._timestep_arg.bind(args, kwargs)
        t = bound.arguments["timestep"]
        if not isinstance(t, torch.Tensor):
            args, kwargs = TimestepArg.substitute(bound, tensor_timestep(t, self.device))

        def fn(*a: Any, **kw: Any) -> Any:
            ex.begin_step(policy)  # the exchange points count from 0 in every run (warm-up runs of a capture)
            return original(*a, **kw)

        steady = StepPolicy(self.sync_mode, self._call_warm_up, self._call_warm_up).packed_regions
        if comm_inside:  # its captured channel ops must not overtake the K/V still in flight (Note [deferred K/V])
            ex.await_deferred()
        return self.graphs.run(fn, key, args, kwargs, comm_inside, lambda: ex.prepare_transport(steady))


class _CurrentExchange:
    """The layers' handle on the exchange of the current call signature (replaced when the shapes change)."""

    def __init__(self, owner: PatchParallel):
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.exchange, name)


def _shapes_of(arguments: dict) -> tuple:
    """What the exchange points depend on: the shapes and dtypes of the call's tensors (not the timestep's value)."""
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(dict(arguments))
    return tuple((tuple(x.shape), x.dtype) for x in leaves if isinstance(x, torch.Tensor))


def _world_size(group: Any) -> int:
    if dist_ready():
        import torch.distributed as dist

        return dist.get_world_size(group)
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_warm_up(warm_up: Any) -> None:
    if not isinstance(warm_up, int) or isinstance(warm_up, bool) or warm_up < 1:
        raise ConfigError(
            f"warm_up must be an integer >= 1, got {warm_up!r}: the first step must be exact "
            "(warm_up >= the number of steps runs the whole loop exactly)"
        )
