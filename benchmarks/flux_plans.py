"""FLUX.1-dev plans for n = 2..8 at 1024 px, bf16: ours (time-balanced), memory-balanced (balance="memory") and
equal block counts (what xDiT's pipeline stages do), with the split quality s = sum / max of segment costs (ideal
n) and the weights each rank holds.

    python benchmarks/flux_plans.py --out benchmarks/results                  # FLOP model, no GPU: seconds
    python benchmarks/flux_plans.py --cost measured --out benchmarks/results  # GPU: ~1 min on an H200
    python benchmarks/flux_plans.py --model tiny:flux --cost measured --size 128 --out /tmp/p   # CPU check

--cost flops counts each block's FLOPs on the meta device (compiler/flops.py) and writes plan_<model>_flops.*;
--cost measured builds the real transformer on the device in bf16 (22.2 GiB of random weights), times each of its
57 blocks alone (CUDA-graph replay at its real inputs, compiler/cost.py) once, plans every n from those costs, and
writes plan_<model>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from asyncdiff_rt.compiler.cost import device_name  # noqa: E402
from asyncdiff_rt.compiler.plan import Plan  # noqa: E402
from asyncdiff_rt.compiler.planning import block_weight_bytes, plan_for  # noqa: E402
from asyncdiff_rt.models.denoiser import find_denoiser  # noqa: E402
from asyncdiff_rt.tools.loading import load_pipeline_for_planning  # noqa: E402

KINDS = ("time", "memory", "equal_counts")
GIB = 2**30


def equal_counts(order: list[str], n: int) -> list[list[str]]:
    """n stages of (nearly) equal block counts, in call order."""
    size, extra = divmod(len(order), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(order[start:end])
        start = end
    return out


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _summary(plan: Plan, n: int) -> dict:
    weights = [s.weight_bytes / GIB for s in plan.segments]
    costs = [s.cost_ms for s in plan.segments]
    return {
        "split_quality": plan.split_quality(),
        "s_over_n": plan.split_quality() / n,
        "slowest_ms": max(costs),
        "segment_ms": costs,
        "weights_gib": weights,
        "max_weights_gib": max(weights),
        "min_weights_gib": min(weights),
        "blocks_per_segment": [len(s.blocks) for s in plan.segments],
        "segments": [list(s.blocks) for s in plan.segments],
    }


def plan_rows(pipe, ns: list[int], cost: str, size: int, repeats: int = 20) -> tuple[list[dict], dict]:
    """Per n the three plans' summaries, and what they share: block order and costs, the model's bytes (its blocks'
    and the replicated glue's). Block costs come from one plan_for (measured once, or counted once), then are
    given to every other plan, so all plans of the table split the same costs."""
    _, den = find_denoiser(pipe)
    t0 = time.perf_counter()
    first = plan_for(pipe, ns[0], height=size, width=size, cost=cost, repeats=repeats)
    cost_s = time.perf_counter() - t0
    order, costs = first.meta["order"], first.meta["block_ms"]
    weights = block_weight_bytes(den, order)
    total = _tensor_bytes(den)
    info = {
        "order": order,
        "block_ms": costs,
        "block_gib": {b: weights[b] / GIB for b in order},
        "denoiser_ms": first.meta.get("denoiser_ms"),
        "cost_model": first.meta["cost_model"],
        "costs_from_cache": first.meta.get("costs_from_cache", False),
        "device": first.meta["device"],
        "batch": first.meta["batch"],
        "cost_s": cost_s,
        "model_gib": total / GIB,
        "blocks_gib": sum(weights.values()) / GIB,
        "replicated_gib": (total - sum(weights.values())) / GIB,
    }
    rows = []
    for n in ns:
        common = dict(height=size, width=size, costs=costs)
        time_plan = first if n == ns[0] else plan_for(pipe, n, **common)
        memory_plan = plan_for(pipe, n, balance="memory", **common)
        equal = Plan.from_spec(equal_counts(order, n))
        for seg in equal.segments:
            seg.cost_ms = sum(costs[b] for b in seg.blocks)
            seg.weight_bytes = sum(weights[b] for b in seg.blocks)
        plans = {"time": time_plan, "memory": memory_plan, "equal_counts": equal}
        rows.append({"n": n, **{k: _summary(plans[k], n) for k in KINDS}})
        print(f"n={n}: s " + ", ".join(f"{k} {rows[-1][k]['split_quality']:.3f}" for k in KINDS), flush=True)
    return rows, info


def _group_ms(info: dict, prefix: str) -> tuple[int, float]:
    ms = [v for b, v in info["block_ms"].items() if b.startswith(prefix)]
    return len(ms), (sum(ms) / len(ms) if ms else float("nan"))


def markdown(meta: dict, rows: list[dict], info: dict) -> str:
    measured = info["cost_model"] == "measured"
    timing = "CUDA-graph replay, median" if meta["device_type"] == "cuda" else "eager, minimum"
    how = (
        f"every block timed alone on {info['device']} ({timing}; {info['cost_s']:.0f} s)"
        if measured
        else "the FLOP model (counted on the meta device; no GPU)"
    )
    # a tiny model's weights read as 0.00 GiB: MiB below a GiB
    unit, scale = ("GiB", 1) if info["model_gib"] >= 1 else ("MiB", 1024)
    nd, dms = _group_ms(info, "transformer_blocks.")
    ns_, sms = _group_ms(info, "single_transformer_blocks.")
    whole = info.get("denoiser_ms")
    tunit = "ms" if measured else "ms at a nominal rate"
    lines = [
        f"# {meta['model']} plans at {meta['size']} px, {meta['dtype']}, batch {info['batch']} — {meta['device']}",
        "",
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}. Block costs from {how}: "
        f"{nd} double-stream blocks {dms:.3f} {tunit} each (mean), {ns_} single-stream {sms:.3f}; sum of blocks "
        f"{sum(info['block_ms'].values()):.2f}"
        + (f", whole transformer {whole:.2f} ms" if whole else "")
        + f". The same costs for every plan below. Weights: the model {info['model_gib'] * scale:.2f} {unit} = its "
        f"blocks {info['blocks_gib'] * scale:.2f} + the replicated glue {info['replicated_gib'] * scale:.2f} "
        "(embeddings, projections: every rank holds them); per rank = its own blocks, plus the glue on top.",
        "",
        "s = sum / max of segment costs (ideal n); s/n its efficiency. `time`: our cost-balanced plan (the default). "
        '`memory`: balance="memory" (the heaviest rank as light as possible). `equal counts`: the same number of '
        "blocks per stage (xDiT's pipeline stages).",
        "",
        f"| n | time: s | s/n | weights/rank {unit} (min–max) | memory: s | s/n | weights/rank (min–max) "
        "| equal counts: s | s/n | weights/rank (min–max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [str(r["n"])]
        for k in KINDS:
            v = r[k]
            cells += [
                f"{v['split_quality']:.3f}",
                f"{v['s_over_n']:.3f}",
                f"{v['min_weights_gib'] * scale:.2f}–{v['max_weights_gib'] * scale:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Weights per rank ({unit}, own blocks) and blocks per segment:", ""]
    lines += ["| n | plan | weights per rank | blocks per segment |", "|---|---|---|---|"]
    for r in rows:
        for k in KINDS:
            w = " / ".join(f"{g * scale:.2f}" for g in r[k]["weights_gib"])
            b = " / ".join(map(str, r[k]["blocks_per_segment"]))
            lines.append(f"| {r['n']} | {k.replace('_', ' ')} | {w} | {b} |")
    return "\n".join(lines) + "\n"


def stem_for(out: str, model: str, cost: str, device: str) -> str:
    """plan_<model>_flops, or plan_<model>_<device> for measured costs ("NVIDIA H200" -> nvidia-h200, as
    plan_table.py spells devices)."""
    safe = model.replace(":", "_")
    if cost == "flops":
        return os.path.join(out, f"plan_{safe}_flops")
    return os.path.join(out, f"plan_{safe}_{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux", help="flux, flux_schnell, or tiny:flux (a CPU check)")
    p.add_argument("--cost", default="flops", choices=("flops", "measured"))
    p.add_argument("--device", default=None, help="measured: where to time (default cuda if there, else cpu)")
    p.add_argument("--size", type=int, default=1024, help="pixels")
    p.add_argument("--max_n", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="measured: timed calls per block")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    import diffusers

    t_start = time.perf_counter()
    if args.cost == "flops":
        device = "meta"
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device != "cpu" else torch.float32  # bf16 as FLUX.1 ships; a CPU check in float32
    pipe = load_pipeline_for_planning(args.model, dtype=dtype, device=device)
    print(f"{args.model} built on {device} in {time.perf_counter() - t_start:.1f} s", flush=True)
    rows, info = plan_rows(pipe, list(range(2, args.max_n + 1)), args.cost, args.size, args.repeats)
    dev = torch.device(device)
    meta = {
        "model": args.model,
        "size": args.size,
        "dtype": str(dtype).replace("torch.", ""),
        "cost_model": args.cost,
        "device": device_name(dev) if dev.type != "meta" else "meta (FLOP model)",
        "device_type": dev.type,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": datetime.date.today().isoformat(),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = stem_for(args.out, args.model, args.cost, meta["device"] if dev.type == "cuda" else dev.type)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "info": info, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows, info))
    print(f"written: {stem}.json, {stem}.md in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
