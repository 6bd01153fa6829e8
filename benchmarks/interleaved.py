"""Two or more one-process bench variants measured *interleaved*, for a difference smaller than the drift between
consecutive runs: every variant's pipeline is built, warmed (captured, compiled) and kept, then each round times
one call of every variant, the order reversed every other round (A B, B A, A B, ...), so that a slow trend of the
machine (clocks, temperature) falls on all of them alike. Run in sequence, FLUX's compile_ro and ours_n1_compile
each came out 0.5-0.9 % slower when measured second (benchmarks/results/latency_flux*_NVIDIA_H200.md).

    python benchmarks/interleaved.py --model flux --variants compile_ro,ours_n1_compile --out benchmarks/results
    python benchmarks/interleaved.py --model tiny:sd15 --variants eager,ours_n1 --rounds 2 --device cpu   # a smoke run

Per variant: the median, min and max of its timed calls; per variant after the first: the median over rounds of
its time / the first variant's time in the same round (the paired ratio), with its min and max. Writes
interleaved_<model>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncdiff_rt.tools.bench import _latents, _seeded, _sync, setup_single  # noqa: E402
from asyncdiff_rt.tools.bench_setup import model_steps  # noqa: E402
from asyncdiff_rt.tools.emulate import write_results  # noqa: E402


def _timed(pipe, kwargs) -> tuple[float, torch.Tensor]:
    _sync()
    t0 = time.perf_counter()
    latents = _latents(pipe(**_seeded(kwargs)))
    _sync()
    return time.perf_counter() - t0, latents


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variants", required=True, help="a comma list of one-process bench variants, the first the base")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's (FLUX.1-dev 28)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if len(variants) < 2:
        ap.error("--variants: at least two")
    steps = args.steps or model_steps(args.model)
    pipes, first_call = {}, {}
    for v in variants:  # all built and warmed before any timing; kept side by side
        pipes[v] = setup_single(args.model, v, steps, args.device, fresh=False)
        first_call[v], _ = _timed(*pipes[v])
        print(f"{v}: warm call {first_call[v]:.2f} s", flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    latents = {}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            t, latents[v] = _timed(*pipes[v])
            times[v].append(t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in variants), flush=True)
    base = variants[0]
    rows = []
    for v in variants:
        ratios = [t / b for t, b in zip(times[v], times[base])]
        rows.append({"variant": v, "first_call_s": first_call[v], "times_s": times[v],
                     "median_s": statistics.median(times[v]), "min_s": min(times[v]), "max_s": max(times[v]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "max_abs_vs_base": float((latents[v].float() - latents[base].float()).abs().max())})  # fmt: skip
    cuda = torch.cuda.is_available() and args.device != "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    lines = [
        f"# {args.model}, {steps} steps: {', '.join(variants)} interleaved ({name})",
        "",
        f"torch {torch.__version__}, {datetime.date.today()}. One process, alone on the device. {args.rounds} rounds, "
        "each one timed call of every variant, the order reversed every other round; every pipeline built and warmed "
        f"first. ratio: time / {base}'s in the same round (median, min–max over rounds; < 1: faster). "
        f"max |Δ|: of the final latents against {base}'s.",
        "",
        f"| variant | median (s) | min–max (s) | vs {base} (paired) | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | "
                     f"{r['ratio_median']:.4f} ({r['ratio_min']:.4f}–{r['ratio_max']:.4f}) | "
                     f"{r['max_abs_vs_base']:.3g} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"interleaved_{args.model.replace(':', '_')}_{name.replace(' ', '_')}")
        meta = {"model": args.model, "steps": steps, "rounds": args.rounds, "device": name,
                "torch": torch.__version__, "date": str(datetime.date.today())}  # fmt: skip
        write_results(stem, {"meta": meta, "rows": rows}, lambda _: text)


if __name__ == "__main__":
    main()
