"""``plan_for``: the partition of a pipeline's denoiser for a resolution and ``model_n`` (docs/architecture.md).

Steps: example denoiser inputs built from the denoiser's config (the shapes the pipeline will pass at that
resolution); one trace on a ``meta`` twin of the denoiser (no compute; falls back to a real forward when the twin
cannot be built or traced); block costs, by the cost model ``cost``: "measured" (each block timed on the target
device, or read from the disk cache: cost.py) or "flops" (FLOPs counted on the meta twin: flops.py; no memory, no
compute, so a CPU can plan SDXL in seconds); "auto" picks "measured" on CUDA and "flops" elsewhere; the
dynamic-programming partition. ``plan_table.format_plan_table`` prints a plan as ``asyncdiff-rt plan`` shows it.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..models import adapter_for
from .blocks import candidate_blocks
from .cost import arch_hash, device_name, measure_block_costs
from .flops import NOMINAL_TFLOPS, flop_block_costs
from .layouts import to_meta
from .partition import partition
from .plan import Plan
from .trace import Trace, meta_twin, trace_denoiser

__all__ = [
    "BALANCES",
    "COST_MODELS",
    "block_weight_bytes",
    "plan_for",
    "plan_for_denoiser",
    "resolve_cost_model",
    "trace_for_plan",
]

BALANCES = ("time", "memory")


def block_weight_bytes(denoiser: nn.Module, blocks: list[str]) -> dict[str, int]:
    """Bytes of parameters and buffers each block holds (what a rank keeps of it with dropped weights)."""
    modules = dict(denoiser.named_modules())
    return {
        b: sum(t.numel() * t.element_size() for t in list(modules[b].parameters()) + list(modules[b].buffers()))
        for b in blocks
    }


COST_MODELS = ("auto", "measured", "flops")


def resolve_cost_model(cost: str, device: torch.device | str | None) -> str:
    """ "auto" -> "measured" on CUDA (the figures that matter), "flops" on a CPU or meta (timing there is slow, needs
    the weights in memory, and does not predict a GPU); "measured" and "flops" stay."""
    if cost not in COST_MODELS:
        raise ValueError(f"cost must be one of {', '.join(COST_MODELS)}, got {cost!r}")
    if cost != "auto":
        return cost
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return "measured" if kind == "cuda" else "flops"


def _input_shapes(args: tuple, kwargs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, a in enumerate(args):
        out[f"arg{i}"] = list(a.shape) if isinstance(a, torch.Tensor) else repr(a)
    flat = pytree.tree_flatten_with_path(kwargs)[0]
    for path, v in flat:
        if isinstance(v, torch.Tensor):
            out[pytree.keystr(path)] = list(v.shape)
    return out


def trace_for_plan(
    denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str], trace_on: str = "meta"
) -> tuple[Trace, str]:
    """Trace on a meta twin (no compute) or for real; returns the trace and where it ran."""
    if trace_on not in ("meta", "real"):
        raise ValueError(f"trace_on must be 'meta' or 'real', got {trace_on!r}")
    if trace_on == "meta":
        try:
            twin = meta_twin(denoiser)
            margs, mkwargs = to_meta((args, kwargs))
            return trace_denoiser(twin, margs, mkwargs, blocks), "meta"
        except Exception as exc:  # an op without a meta kernel, a twin that cannot be built: trace for real
            trace = trace_denoiser(denoiser, args, kwargs, blocks)
            trace.warnings.append(f"meta trace failed ({type(exc).__name__}: {exc}); traced with a real forward")
            return trace, "real"
    return trace_denoiser(denoiser, args, kwargs, blocks), "real"


def plan_for_denoiser(
    denoiser: nn.Module,
    model_n: int,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    granularity: str = "fine",
    keep_head_tail: bool = False,
    cache: bool = True,
    *,
    pipe: Any = None,
    args: tuple | None = None,
    kwargs: dict | None = None,
    bandwidth_Bps: float | None = None,
    slack: float = 0.0,
    repeats: int = 20,
    trace_on: str = "meta",
    costs: dict[str, float] | None = None,
    cost: str = "measured",
    balance: str = "time",
    **denoiser_call_overrides: Any,
) -> Plan:
    """``plan_for`` on a bare denoiser. ``args``/``kwargs`` give its call directly (else built from its config at
    height x width); ``costs`` skips the cost model (block -> ms); ``cost`` is the cost model (module docstring).
    ``balance``: "time" (default: the slowest segment as fast as possible) or "memory" (the segment holding the
    most weights as light as possible, e.g. FLUX, whose double-stream blocks hold 2.4x a single one's weights);
    each segment's weights are in the plan either way (``Segment.weight_bytes``)."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    param = next(denoiser.parameters(), None)
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    device = (
        torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    )
    cost = resolve_cost_model(cost, device)
    if device.type == "meta" and cost == "measured" and costs is None:
        raise ValueError("plan_for needs a real device to time blocks on (or cost='flops', which needs none)")
    adapter = adapter_for(denoiser)
    if batch is None:
        batch = adapter.default_batch(pipe)
    if args is None and kwargs is None:
        if height is None or width is None:
            default_h, default_w = adapter.default_resolution(pipe)
            height, width = height or default_h, width or default_w
        args, kwargs = adapter.example_call(height, width, batch, dtype, device, pipe, **denoiser_call_overrides)
    args, kwargs = tuple(args or ()), dict(kwargs or {})

    moved = param is not None and (param.device != device or param.dtype != dtype)
    if moved:
        old_device, old_dtype = param.device, param.dtype
        nn.Module.to(denoiser, device=device, dtype=dtype)
    try:
        blocks = candidate_blocks(denoiser, granularity)
        trace, traced_on = trace_for_plan(denoiser, args, kwargs, blocks, trace_on)
        order = [b for b in trace.order if b in set(blocks)]
        if costs is None and cost == "flops":
            costs = flop_block_costs(denoiser, args, kwargs, order, device)
        elif costs is None:
            costs = measure_block_costs(denoiser, args, kwargs, order, trace, device, repeats=repeats, cache=cache)
        else:
            cost = "given"
    finally:
        if moved:
            nn.Module.to(denoiser, device=old_device, dtype=old_dtype)
    never = [b for b in blocks if b not in set(order)]
    meta = {
        "arch": f"{type(denoiser).__name__}:{arch_hash(denoiser)}",
        "shape": _input_shapes(args, kwargs),
        "height": height,
        "width": width,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device) if device.type != "meta" else "meta",
        "granularity": granularity,
        "traced_on": traced_on,
        "order": order,
        "block_ms": {b: float(costs[b]) for b in order},
        "denoiser_ms": getattr(costs, "denoiser_ms", None),
        "costs_from_cache": getattr(costs, "from_cache", False),
        "cost_model": cost,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cost == "flops":
        meta["nominal_tflops"] = NOMINAL_TFLOPS  # block_ms = FLOPs / this rate: a scale, not a prediction
        meta["block_gflop"] = {b: float(costs.gflop[b]) for b in order}
    if never:
        meta["not_called"] = never  # listed candidates this call never runs: left replicated (never used)
    if trace.warnings:
        meta["trace_warnings"] = trace.warnings
    weights = block_weight_bytes(denoiser, order)
    if balance == "memory":  # the same DP on weights: each block's cost is its bytes (in GB, for readable meta)
        meta["balance"] = "memory"
    plan = partition(
        order,
        {b: weights[b] / 1e9 for b in order} if balance == "memory" else costs,
        trace,
        model_n,
        bandwidth_Bps=bandwidth_Bps,
        keep_head_tail=keep_head_tail,
        meta=meta,
        slack=slack,
    )
    for seg in plan.segments:
        seg.weight_bytes = sum(weights[b] for b in seg.blocks)
        if balance == "memory":  # the partition balanced bytes; the segment's cost is still its compute
            seg.cost_ms = float(sum(costs[b] for b in seg.blocks))
    return plan


def plan_for(
    pipe: Any,
    model_n: int,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    granularity: str = "fine",
    keep_head_tail: bool = False,
    cache: bool = True,
    controlnet: str = "auto",
    cost: str = "measured",
    **denoiser_call_overrides: Any,
) -> Plan:
    """The partition of ``pipe``'s denoiser into ``model_n`` segments at ``height`` x ``width`` pixels
    (default: the pipeline's default size, the denoiser's sample_size times the VAE scale factor).

    ``batch`` defaults to 2 when classifier-free guidance applies (the pipelines' default) else 1; ``dtype`` and
    ``device`` to the denoiser's. ``cost`` is the cost model: "measured" (the default; block times on the device,
    cached on disk, ``cache=False`` measures again), "flops" (FLOP counts on the meta device: seconds, no memory;
    the denoiser may itself be on meta) or "auto" ("measured" on CUDA, else "flops"). Keyword
    arguments ``bandwidth_Bps``, ``slack``, ``repeats``, ``trace_on`` ("meta" or "real") and ``costs`` pass to
    ``plan_for_denoiser``; any other keyword overrides an argument of the denoiser's call (e.g. ``num_frames``).
    ``controlnet`` as AsyncDiff's: with "auto"/"blocks" a ControlNet pipeline's plan lists ControlNet and UNet
    blocks (``controlnet.*``, ``unet.*``).
    """
    from ..models.controlnet import controlnet_mode
    from ..models.denoiser import find_denoiser

    with controlnet_mode(pipe, controlnet):
        _, denoiser = find_denoiser(pipe)
        return plan_for_denoiser(
            denoiser,
            model_n,
            height,
            width,
            batch,
            dtype,
            device,
            granularity,
            keep_head_tail,
            cache,
            pipe=pipe,
            cost=cost,
            **denoiser_call_overrides,
        )
