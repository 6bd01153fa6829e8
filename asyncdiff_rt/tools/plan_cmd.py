"""`asyncdiff-rt plan`: say what it will do and roughly how long, build the model where the cost model needs it,
plan.

Why the preamble: the measured cost model builds the real architecture with random weights and times every block
on the device; for SDXL on a CPU that is 10+ GB and can take an hour, and it used to print nothing meanwhile.
The FLOP cost model (compiler/flops.py) builds the architecture on the meta device instead: seconds, no memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["make_plan", "cpu_gflops", "describe_cost_model"]

# what a measured plan runs per block on the device: the capture forward, warm-up calls and the timed calls
_WARMUP = 3


def _say(text: str) -> None:
    print(f"plan: {text}", file=sys.stderr, flush=True)


def cpu_gflops(seconds: float = 0.2) -> float:
    """This process's float32 matrix-multiply rate in GFLOP/s, from `seconds` of 512x512 products (an optimistic
    bound for convolutions and attention, which is what a rough time estimate needs)."""
    a = torch.randn(512, 512)
    torch.mm(a, a)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, a)
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - start) / 1e9


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _param_bytes(denoiser: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in denoiser.parameters()) * torch.empty((), dtype=dtype).element_size()


def make_plan(args: argparse.Namespace):
    from ..compiler.planning import plan_for, resolve_cost_model
    from ..models.denoiser import find_denoiser
    from .loading import load_pipeline_for_planning

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    cost = resolve_cost_model(args.cost, device)
    common = dict(
        height=args.height, width=args.width, granularity=args.granularity, balance=getattr(args, "balance", "time")
    )
    if cost == "flops":
        _say(
            f"cost model flops: {args.model} built on the meta device (no weights, no memory), FLOPs per block "
            "counted in one forward; takes seconds (--cost measured times the blocks on the device instead)"
        )
        pipe = load_pipeline_for_planning(args.model, dtype=dtype, device="meta")
        return plan_for(pipe, args.model_n, cost="flops", **common)

    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    # the FLOP count on meta first (seconds): how many blocks, and on a CPU how long the timing will take
    on_meta = load_pipeline_for_planning(args.model, dtype=dtype, device="meta")
    preview = plan_for(on_meta, args.model_n, cost="flops", **common)
    blocks, gflop = len(preview.meta["order"]), sum(preview.meta["block_gflop"].values())
    memory = _param_bytes(find_denoiser(on_meta)[1], getattr(torch, dtype))
    del on_meta
    line = (
        f"cost model measured: builds {args.model} on {device} ({_size(memory)} of {dtype} weights), then times "
        f"{blocks} blocks {repeats + _WARMUP} times each"
    )
    if device.type == "cpu":
        # each block runs repeats + warm-up times, then the whole denoiser a few times more: in FLOPs about
        # (repeats + warm-up + 1 capture + 6 whole) forwards
        runs = repeats + _WARMUP + 1 + 6
        minutes = gflop * runs / cpu_gflops() / 60
        rough = f"{minutes:.0f} min" if minutes >= 1 else "under a minute"
        line += f"; on this CPU roughly {rough}, likely more (--cost flops takes seconds)"
    _say(line)
    pipe = load_pipeline_for_planning(args.model, dtype=dtype, device=device)
    return plan_for(pipe, args.model_n, cost="measured", repeats=repeats, **common)


def describe_cost_model(plan) -> str:
    """The line under the plan table that names the cost model its "ms" column comes from."""
    m = plan.meta
    if m.get("cost_model") == "flops":
        return (
            f"cost model: flops (FLOPs counted on the meta device; ms = FLOPs at a nominal {m['nominal_tflops']:g} "
            "TFLOP/s, only their ratios shape the plan; --cost measured times the blocks)"
        )
    if m.get("cost_model") == "measured":
        cached = ", read from the cache" if m.get("costs_from_cache") else ""
        return f"cost model: measured (every block timed on {m.get('device')}{cached})"
    return f"cost model: {m.get('cost_model', 'given')}"
