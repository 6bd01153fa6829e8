"""Where the time of a steady-state denoising step goes, for one-process variants (issue 6's remaining gap).

For each variant: build it as `asyncdiff_rt/bench.py` does, run one warm call (capture/compile), then profile one
call of --steps steps with torch.profiler (CPU + CUDA). Reported per step: the wall time, the GPU busy time (the
union of kernel and memcpy intervals), the GPU idle time (wall - busy: launch gaps, host work the GPU waits for),
and the host operators that take the most CPU time. JSON + markdown in --out.

    python benchmarks/profile_step.py --model sdxl --variants compile_ro,ours_n1_compile --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from asyncdiff_rt.tools.bench import setup_single  # noqa: E402
from asyncdiff_rt.tools.bench_setup import model_dtype  # noqa: E402


def _busy_us(events: list) -> float:
    """Length of the union of the GPU activity intervals (µs)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy


def profile_variant(model: str, variant: str, steps: int, top: int) -> dict:
    pipe, kwargs = setup_single(model, variant, steps)
    pipe(**kwargs)  # capture / compile
    pipe(**kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        pipe(**kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy_ms = _busy_us(prof.events()) / 1000
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    averages = prof.key_averages()
    ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    # GPU side: what runs, inside graph replays too (a variant's extra work shows as kernels the other lacks)
    kernels = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    del pipe
    torch.cuda.empty_cache()
    return {
        "wall_ms_per_step": wall * 1000 / steps,
        "gpu_busy_ms_per_step": busy_ms / steps,
        "gpu_idle_ms_per_step": (wall * 1000 - busy_ms) / steps,
        "top_cpu_ops": [
            {"name": e.key, "calls": e.count, "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in ops
        ],
        "top_gpu_ops": [
            {
                "name": e.key,
                "calls_per_step": e.count / steps,
                "gpu_ms_per_step": e.self_device_time_total / 1000 / steps,
            }
            for e in kernels[:top]
        ],
        "gpu_ops_per_step": sum(e.count for e in kernels) / steps,
        "table": table,
        "note": "wall includes profiler overhead; compare variants within this file only",
    }


def main() -> int:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--variants", default="graph_floor,ours_n1,compile_ro,ours_n1_compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step measures GPU time: no CUDA device here")
    device = torch.cuda.get_device_name(0)
    stem = os.path.join(args.out, f"profile_{args.model}_{device.replace(' ', '_')}")
    data = {
        "meta": {
            "model": args.model,
            "steps": args.steps,
            "device": device,
            "dtype": str(model_dtype(args.model, "cuda")).replace("torch.", ""),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": datetime.date.today().isoformat(),
        },
        "variants": {},
    }
    for variant in [v for v in args.variants.split(",") if v]:
        print(f"{variant}: profiling", flush=True)
        data["variants"][variant] = profile_variant(args.model, variant, args.steps, args.top)
        os.makedirs(args.out, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=2)
    meta = data["meta"]
    lines = [
        f"# Step profile: {meta['model']}, {meta['steps']} steps profiled, {meta['dtype']} — {meta['device']}",
        "",
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}. One profiled call after two warm "
        "calls; wall includes the profiler's own overhead, so compare rows with each other only.",
        "",
        "| variant | wall / step (ms) | GPU busy / step (ms) | GPU idle / step (ms) | top host op (self CPU ms/step) |",
        "|---|---|---|---|---|",
    ]
    for name, r in data["variants"].items():
        op = r["top_cpu_ops"][0]
        lines.append(
            f"| {name} | {r['wall_ms_per_step']:.2f} | {r['gpu_busy_ms_per_step']:.2f} | "
            f"{r['gpu_idle_ms_per_step']:.2f} | {op['name']} ({op['self_cpu_ms_per_step']:.2f}) |"
        )
    for name, r in data["variants"].items():
        gpu = "; ".join(
            f"{o['name'][:50]} {o['gpu_ms_per_step']:.2f} ({o['calls_per_step']:g}x)" for o in r["top_gpu_ops"]
        )
        lines += ["", f"## {name}", "", f"GPU ops per step: {r['gpu_ops_per_step']:.0f}; largest (ms/step): {gpu}"]
        lines += ["", "```", r["table"], "```"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[: 6 + len(data["variants"])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
