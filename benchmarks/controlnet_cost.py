"""ControlNet + SDXL at 1024 px: which costs less per step, the ControlNet replicated on every rank or listed as
blocks (issue 7, DESIGN §7)? Real architectures with random weights, fp16, batch 2 (CFG), on the GPU.

Measured: every block of the UNet and of the ControlNet timed alone (CUDA-graph replay, as `plan_for` does), the
whole ControlNet, UNet and ControlNet+UNet forwards (graph replay), then for n = 2..N the partitioner's plans:
- replicated: the UNet partitioned; each rank also runs the whole ControlNet every step;
- blocks: ControlNet and UNet partitioned together (asyncdiff_rt.models.controlnet.ControlledUNet).
Per-step compute of the slowest rank = its segment + replicated work (the glue, and the whole ControlNet when
replicated); the bytes that cross segment boundaries per step; the weights each rank holds. JSON + markdown.

    python benchmarks/controlnet_cost.py --out benchmarks/results [--max_n 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from asyncdiff_rt.runtime.executor import CapturedCall  # noqa: E402


def graph_ms(fn, args: tuple, kwargs: dict, repeats: int = 20) -> float:
    """Median time of one CUDA-graph replay of fn(*args, **kwargs)."""
    call = CapturedCall(fn, args, kwargs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def weights_gib(module: torch.nn.Module, plan, segment: int) -> float:
    """Weights one rank holds: its segment's blocks plus everything not listed (replicated)."""
    named = dict(module.named_modules())
    listed = {id(p) for b in plan.blocks for p in named[b].parameters()}
    own = {id(p) for b in plan.segments[segment].blocks for p in named[b].parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in listed or id(p) in own) / 2**30


def main() -> int:
    import diffusers
    from diffusers import ControlNetModel

    from asyncdiff_rt.compiler.planning import plan_for_denoiser
    from asyncdiff_rt.models import example_inputs
    from asyncdiff_rt.models.controlnet import ControlledUNet
    from asyncdiff_rt.tools.archs import build_architecture
    from asyncdiff_rt.tools.loading import DenoiserOnly

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_n", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("controlnet_cost times blocks on the GPU: no CUDA device here")
    device, dtype, size = torch.device("cuda"), torch.float16, args.size
    unet = build_architecture("sdxl", device, dtype)
    controlnet = ControlNetModel.from_unet(unet).to(device=device, dtype=dtype).eval()  # the SDXL ControlNet shape
    composite = ControlledUNet(controlnet, unet).eval()
    pipe = DenoiserOnly(unet, 8, "sdxl")

    with torch.no_grad():
        c_args, c_kwargs = example_inputs(composite, size, size, 2, dtype, device, pipe)
        cn_inputs = dict(c_kwargs["controlnet_inputs"], timestep=c_args[1], return_dict=False)
        u_args, u_kwargs = example_inputs(unet, size, size, 2, dtype, device, pipe)
        whole = {
            "controlnet_ms": graph_ms(controlnet, (), cn_inputs),
            "unet_ms": graph_ms(unet, u_args, u_kwargs),
            "controlnet_plus_unet_ms": graph_ms(composite, c_args, c_kwargs),
        }
    print(whole, flush=True)
    rows = []
    for n in range(2, args.max_n + 1):
        for mode in ("replicated", "blocks"):
            module = composite if mode == "blocks" else unet
            plan = plan_for_denoiser(module, n, height=size, width=size, batch=2, pipe=pipe)
            glue = (plan.meta.get("denoiser_ms") or 0.0) - sum(plan.meta["block_ms"].values())
            slowest = max(s.cost_ms for s in plan.segments)
            step = slowest + max(glue, 0.0) + (whole["controlnet_ms"] if mode == "replicated" else 0.0)
            bytes_step = sum(s.bytes_out or 0 for s in plan.segments)
            weights = [weights_gib(module, plan, s) + (0.0 if mode == "blocks" else _gib(controlnet)) for s in range(n)]
            rows.append(
                {
                    "n": n,
                    "mode": mode,
                    "slowest_segment_ms": slowest,
                    "glue_ms": glue,
                    "step_ms": step,
                    "speedup_vs_one_gpu": whole["controlnet_plus_unet_ms"] / step,
                    "bytes_per_step": bytes_step,
                    "weights_gib_per_rank": weights,
                    "segments_ms": [s.cost_ms for s in plan.segments],
                }
            )
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(0)
    data = {
        "meta": {
            "model": f"SDXL UNet + ControlNetModel.from_unet at {size} px, batch 2, fp16",
            "device": name,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": datetime.date.today().isoformat(),
        },
        "whole": whole,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"controlnet_sdxl_{name.replace(' ', '_')}")
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=2)
    lines = [
        f"# ControlNet replicated or listed as blocks — {data['meta']['model']} — {name}",
        "",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {data['meta']['date']}. One GPU step "
        f"(graph replay): ControlNet {whole['controlnet_ms']:.1f} ms, UNet {whole['unet_ms']:.1f} ms, both "
        f"{whole['controlnet_plus_unet_ms']:.1f} ms. Per-step compute of the slowest rank = its segment + glue "
        "(+ the whole ControlNet when replicated), from block costs measured by graph replay.",
        "",
        "| n | ControlNet | slowest rank / step (ms) | vs one GPU | MB crossing / step | weights GiB / rank (max) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['step_ms']:.1f} | {r['speedup_vs_one_gpu']:.2f}x | "
            f"{r['bytes_per_step'] / 1e6:.0f} | {max(r['weights_gib_per_rank']):.2f} |"
        )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


if __name__ == "__main__":
    raise SystemExit(main())
