"""Plan tables for the real SD2.1 (768 px) and SDXL (1024 px) UNets: block costs measured on this device, the best
partition for n = 2..8 and its split quality (sum / max of segment costs), at the fine granularity (inside the
Transformer2DModels) and, for comparison, the coarse one (resnets/attentions/samplers, whole mid block).

The architectures are built from their real configs (in asyncdiff_rt.tools.archs) with random weights —
speed does not depend on the weights (DESIGN §8). Tracing runs on a meta twin (no compute); costs are CUDA-graph
replays on CUDA.

    python benchmarks/plan_table.py --model sdxl --out benchmarks/results          # fp16 on CUDA (H100: ~1 min)
    python benchmarks/plan_table.py --model sd21 --tiny --out /tmp/plans           # CPU smoke test, seconds

Writes ``plan_<model>_<device>.json`` and ``.md`` (device name, torch, diffusers, date) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncdiff_rt.compiler.blocks import candidate_blocks  # noqa: E402
from asyncdiff_rt.compiler.cost import device_name, measure_block_costs  # noqa: E402
from asyncdiff_rt.compiler.partition import partition  # noqa: E402
from asyncdiff_rt.compiler.plan_table import format_plan_table  # noqa: E402
from asyncdiff_rt.compiler.planning import trace_for_plan  # noqa: E402
from asyncdiff_rt.models import example_inputs  # noqa: E402
from asyncdiff_rt.tools.archs import SD15, SD21, SDXL  # noqa: E402

MODELS = {"sd15": (SD15, 512), "sd21": (SD21, 768), "sdxl": (SDXL, 1024)}  # configs: asyncdiff_rt.tools.archs


def tiny_config(config: dict) -> dict:
    """The same block structure (names, depths, transformer layers) with channels cut 10x: a CPU smoke test."""
    cfg = dict(config)
    cfg["block_out_channels"] = [c // 10 for c in config["block_out_channels"]]  # 32, 64, 128(, 128)
    cfg["norm_num_groups"] = 8
    cfg["attention_head_dim"] = 8
    cfg["cross_attention_dim"] = 64
    if cfg.get("addition_embed_type") == "text_time":
        cfg["addition_time_embed_dim"] = 16
        cfg["projection_class_embeddings_input_dim"] = 6 * 16 + 32
    return cfg


def build_unet(model: str, device="cpu", dtype=torch.float32, tiny: bool = False):
    from diffusers import UNet2DConditionModel

    config = MODELS[model][0]
    if tiny:
        config = tiny_config(config)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return torch.nn.Module.to(unet, dtype=dtype).eval()


def unet_inputs(unet, height: int, width: int, batch: int, dtype, device):
    return example_inputs(unet, height, width, batch, dtype, device)


def split_table(plans: dict[int, object]) -> list[str]:
    lines = [
        "| n | split quality sum/max | slowest segment ms | objective ms | MB across boundaries | head blocks |",
        "|---|---|---|---|---|---|",
    ]
    for n, plan in plans.items():
        costs = [s.cost_ms for s in plan.segments]
        moved = sum(s.bytes_in for s in plan.segments) / 1e6
        lines.append(
            f"| {n} | {plan.split_quality():.3f} | {max(costs):.3f} | {plan.meta['objective_ms']:.3f} | {moved:.1f} "
            f"| {plan.meta['head_blocks']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    ap.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one image with CFG)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="float16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--granularity", default="fine,coarse")
    ap.add_argument("--n", default="2,3,4,5,6,7,8", help="model_n values")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s per GPU link: count boundary transfers")
    ap.add_argument("--slack", type=float, default=0.0, help="relative slack on the slowest segment for fewer bytes")
    ap.add_argument("--tiny", action="store_true", help="channels cut 10x, 128 px unless --resolution: a smoke test")
    ap.add_argument("--no-cache", action="store_true", help="time the blocks again even if cached")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    resolution = args.resolution or (128 if args.tiny else MODELS[args.model][1])
    ns = [int(x) for x in args.n.split(",")]
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else None
    t_start = time.time()
    unet = build_unet(args.model, device, dtype, tiny=args.tiny)
    inputs = unet_inputs(unet, resolution, resolution, args.batch, dtype, device)
    import diffusers

    dev_name = device_name(device)
    result = {
        "model": args.model + ("-tiny" if args.tiny else ""),
        "resolution": resolution,
        "batch": args.batch,
        "bandwidth_GBps": args.bandwidth,
        "slack": args.slack,
        "dtype": str(dtype).replace("torch.", ""),
        "device": dev_name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "granularities": {},
    }
    md = [
        f"# Plans for {result['model']} at {resolution} px, batch {args.batch}, {result['dtype']}",
        "",
        f"Device {dev_name}; torch {torch.__version__}; diffusers {diffusers.__version__}; {result['date']}.",
        "Block costs: each block alone at its real input shapes, "
        + ("CUDA-graph replay, median (CUDA events)." if device.type == "cuda" else "eager, minimum (perf_counter)."),
        "Partition objective: the slowest segment's "
        + (f"compute plus its boundary bytes at {args.bandwidth} GB/s" if bandwidth else "compute (no bandwidth given)")
        + f"; slack {args.slack}. 'MB across boundaries': bytes all segments receive per step.",
        "",
    ]
    for granularity in args.granularity.split(","):
        blocks = candidate_blocks(unet, granularity)
        t0 = time.time()
        trace, traced_on = trace_for_plan(unet, *inputs, blocks)
        t_trace = time.time() - t0
        order = trace.order
        t0 = time.time()
        costs = measure_block_costs(unet, *inputs, order, trace, device, repeats=args.repeats, cache=not args.no_cache)
        t_cost = time.time() - t0
        total = sum(costs.values())
        largest = max(order, key=costs.__getitem__)
        meta = {
            "arch": f"{type(unet).__name__}:{args.model}",
            "height": resolution,
            "width": resolution,
            "batch": args.batch,
            "dtype": result["dtype"],
            "device": dev_name,
            "granularity": granularity,
            "order": order,
            "denoiser_ms": costs.denoiser_ms,
        }
        g = {
            "blocks": len(order),
            "traced_on": traced_on,
            "trace_s": round(t_trace, 2),
            "cost_s": round(t_cost, 2),
            "costs_from_cache": costs.from_cache,
            "block_ms": dict(costs),
            "timing_modes": sorted(set(costs.modes.values())),
            "blocks_sum_ms": total,
            "denoiser_ms": costs.denoiser_ms,
            "largest_block": [largest, costs[largest]],
            "largest_output_bytes": max(r.nbytes for r in trace.blocks.values()),
            "plans": {},
        }
        md += [
            f"## {granularity} granularity: {len(order)} blocks",
            "",
            f"Sum of blocks {total:.3f} ms; whole UNet {costs.denoiser_ms or float('nan'):.3f} ms; "
            f"largest block {largest} {costs[largest]:.3f} ms ({100 * costs[largest] / total:.1f}%); "
            f"largest block output {g['largest_output_bytes'] / 1e6:.1f} MB.",
            "",
        ]
        for keep in (False, True):
            plans = {}
            for n in ns:
                if n > len(order):
                    continue
                plans[n] = partition(
                    order, costs, trace, n, bandwidth_Bps=bandwidth, keep_head_tail=keep, meta=meta, slack=args.slack
                )
                g["plans"][f"n{n}" + ("_headtail" if keep else "")] = plans[n].to_dict()
            label = "head and tail kept together" if keep else "contiguous"
            md += [f"### Split quality, {label}", "", *split_table(plans), ""]
            if not keep:
                for n, plan in plans.items():
                    table = re.sub(r"^Plan \w+: ", "", format_plan_table(plan))
                    md += [f"#### n = {n}", "", "```", table, "```", ""]
        result["granularities"][granularity] = g
        print(f"[{granularity}] {len(order)} blocks, trace {t_trace:.1f} s, costs {t_cost:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name if device.type == "cuda" else "cpu").strip("-").lower()
    stem = f"plan_{result['model']}_{dev_slug}"
    if args.bandwidth:
        stem += f"_bw{args.bandwidth:g}"
    if args.slack:
        stem += f"_slack{args.slack:g}"
    result["wall_s"] = round(time.time() - t_start, 1)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    for granularity, g in result["granularities"].items():
        qs = [f"{k}={_quality(v):.2f}" for k, v in g["plans"].items() if "_" not in k]
        print(f"{args.model} {granularity}: sum {g['blocks_sum_ms']:.2f} ms; split quality " + " ".join(qs))
    print(f"wrote {out / (stem + '.json')} and .md in {result['wall_s']} s")
    return 0


def _quality(plan_dict: dict) -> float:
    costs = [s["cost_ms"] for s in plan_dict["segments"]]
    return sum(costs) / max(costs) if max(costs) > 0 else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
