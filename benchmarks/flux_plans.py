"""FLUX.1-dev plans for n = 2..8 at 1024 px: time-balanced, memory-balanced and equal block counts (what xDiT does),
with the split quality and the weights per rank. Block costs from the FLOP model (compiler/flops.py, counted on
the meta device: no GPU, no weights); on a GPU, `--cost measured` times the blocks instead.

python benchmarks/flux_plans.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from asyncdiff_rt.compiler.plan import Plan  # noqa: E402
from asyncdiff_rt.compiler.planning import block_weight_bytes, plan_for  # noqa: E402
from asyncdiff_rt.tools.loading import load_pipeline_for_planning  # noqa: E402


def equal_counts(order: list[str], n: int) -> list[list[str]]:
    """n stages of (nearly) equal block counts, in call order."""
    size, extra = divmod(len(order), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(order[start:end])
        start = end
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="flux")
    p.add_argument("--cost", default="flops", choices=("flops", "measured"))
    p.add_argument("--max_n", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = "meta" if args.cost == "flops" else "cuda"
    pipe = load_pipeline_for_planning(args.model, dtype=torch.bfloat16, device=device)
    den = pipe.transformer
    rows = []
    for n in range(2, args.max_n + 1):
        time_plan = plan_for(pipe, n, cost=args.cost)
        memory_plan = plan_for(pipe, n, cost=args.cost, balance="memory")
        order = time_plan.meta["order"]
        costs = time_plan.meta["block_ms"]
        weights = block_weight_bytes(den, order)
        equal = Plan.from_spec(equal_counts(order, n))
        for seg in equal.segments:
            seg.cost_ms = sum(costs[b] for b in seg.blocks)
            seg.weight_bytes = sum(weights[b] for b in seg.blocks)
        row = {"n": n}
        for name, plan in (("time", time_plan), ("memory", memory_plan), ("equal_counts", equal)):
            row[name] = {
                "split_quality": plan.split_quality(),
                "max_weights_gib": max(s.weight_bytes for s in plan.segments) / 2**30,
                "min_weights_gib": min(s.weight_bytes for s in plan.segments) / 2**30,
                "blocks_per_segment": [len(s.blocks) for s in plan.segments],
            }
        rows.append(row)
        print(n, {k: round(v["split_quality"], 3) for k, v in row.items() if k != "n"}, flush=True)
    date = datetime.date.today().isoformat()
    meta = {"model": args.model, "size": 1024, "dtype": "bfloat16", "cost_model": args.cost, "date": date,
            "torch": torch.__version__}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"plan_{args.model}_{args.cost}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# {args.model} plans at 1024 px, bf16, cost model `{args.cost}` — {date}",
        "",
        "Block costs from the FLOP model (counted on the meta device; no GPU): split quality = sum / max of segment "
        "costs (ideal n). Weights per rank = the rank's own blocks (the replicated embeddings and projections come "
        "on top, ~0.1 GiB). `equal counts` is what xDiT's pipeline stages do.",
        "",
        "| n | time-balanced: s | its weights per rank, GiB (min–max) | memory-balanced: s | its weights (min–max) "
        "| equal counts: s | its weights (min–max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [str(r["n"])]
        for name in ("time", "memory", "equal_counts"):
            v = r[name]
            cells += [f"{v['split_quality']:.3f}", f"{v['min_weights_gib']:.1f}–{v['max_weights_gib']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
