"""One patch's self-attention K/V path at SDXL's real shapes, on one GPU: the keys and values of every patch
concatenated before attention (to_k, to_v, stack into the exchange slot, cat with the other patches') against
one whole buffer per point (the own part written by the projections' GEMMs, attention reading the buffer in
place), in the patch-major layout of f15cd96 and the K/V-major one of strategies/patches/layers.py now (Note [kv
slots] in exchange.py). Also checks that all three give the same output.

    python benchmarks/patch_attention.py --out benchmarks/results
    python benchmarks/patch_attention.py --device cpu --iters 2      # a smoke run (no timing claims)

Per shape: median kernel time of --iters calls (CUDA events), fp16. Writes patch_attention_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncdiff_rt.strategies.patches.layers import _project_into  # noqa: E402
from asyncdiff_rt.tools.emulate import write_results  # noqa: E402

# (name, tokens of the whole image, channels = inner, heads) of SDXL's self-attention levels, batch 2 (CFG)
LEVELS = {
    "sdxl_2048_level1": (128 * 128, 640, 10),
    "sdxl_2048_level2": (64 * 64, 1280, 20),
    "sdxl_1024_level2": (32 * 32, 1280, 20),
}


def _split(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2)


def concatenated(x, to_k, to_v, q, others, heads):
    """Before: (2, batch, tokens, inner) stacked into the slot, then cat with the other patches' along tokens."""
    own = torch.stack([to_k(x), to_v(x)])
    kv = torch.cat([own, *others], dim=2)
    return F.scaled_dot_product_attention(_split(q, x.shape[0], heads), _split(kv[0], x.shape[0], heads),
                                          _split(kv[1], x.shape[0], heads))  # fmt: skip


def whole_buffer(x, to_k, to_v, q, whole, rank, heads):
    """f15cd96: own K/V written into part `rank` of (P, tokens, batch, 2, inner), one strided GEMM output per
    batch row; attention reads all of it in place."""
    batch, tokens = x.shape[:2]
    own = whole[rank]
    for j, linear in enumerate((to_k, to_v)):
        for b in range(batch):
            torch.mm(x[b], linear.weight.t(), out=own[:, b, j])
    kv = whole.view(-1, batch, 2, whole.shape[-1])

    def split(t):
        return t.permute(1, 0, 2).view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(_split(q, batch, heads), split(kv[:, :, 0]), split(kv[:, :, 1]))


def k_v_major(x, to_k, to_v, q, whole, rank, heads):
    """Now (layers.py): own K/V written into part `rank` of (2, batch, P, tokens, inner), one contiguous (tokens,
    inner) GEMM output per batch row and K/V; attention reads K = whole[0] and V = whole[1] as (batch, P x tokens,
    inner), the layout a concatenation gives it."""
    batch = x.shape[0]
    _project_into(to_k, x, whole[0, :, rank])
    _project_into(to_v, x, whole[1, :, rank])

    def split(t):
        return t.reshape(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(_split(q, batch, heads), split(whole[0]), split(whole[1]))


def _time(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, patches: int, iters: int, device: torch.device, dtype: torch.dtype) -> dict:
    tokens_all, inner, heads = LEVELS[name]
    batch, tokens = 2, tokens_all // patches
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, tokens, inner, generator=g).to(device, dtype)
    to_k, to_v = (torch.nn.Linear(inner, inner, bias=False).to(device, dtype) for _ in range(2))
    q = torch.randn(batch, tokens, inner, generator=g).to(device, dtype)
    others = [torch.randn(2, batch, tokens, inner, generator=g).to(device, dtype) for _ in range(patches - 1)]
    whole = torch.empty(patches, tokens, batch, 2, inner, device=device, dtype=dtype)
    major = torch.empty(2, batch, patches, tokens, inner, device=device, dtype=dtype)
    rank = 0
    for p, o in zip([p for p in range(patches) if p != rank], others):  # the same other patches in every layout
        whole[p].copy_(o.permute(2, 1, 0, 3))
        major[:, :, p].copy_(o)
    with torch.no_grad():
        before = concatenated(x, to_k, to_v, q, others, heads)
        after = whole_buffer(x, to_k, to_v, q, whole, 0, heads)
        candidate = k_v_major(x, to_k, to_v, q, major, 0, heads)
        diff = (before.float() - after.float()).abs().max().item()
        diff_major = (before.float() - candidate.float()).abs().max().item()
        t_before = _time(lambda: concatenated(x, to_k, to_v, q, others, heads), iters, device)
        t_after = _time(lambda: whole_buffer(x, to_k, to_v, q, whole, 0, heads), iters, device)
        t_major = _time(lambda: k_v_major(x, to_k, to_v, q, major, 0, heads), iters, device)
    return {"shape": name, "patches": patches, "tokens_per_patch": tokens, "inner": inner, "heads": heads,
            "concatenated_ms": t_before, "whole_buffer_ms": t_after, "ratio": t_after / t_before,
            "max_abs_diff": diff, "k_v_major_ms": t_major, "k_v_major_ratio": t_major / t_before,
            "k_v_major_max_abs_diff": diff_major}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for patch_attention_<device>.json/.md (default: print only)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = [measure(n, p, args.iters, device, dtype) for n in LEVELS for p in (2, 4)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# One patch's self-attention K/V path, SDXL shapes, batch 2, {str(dtype).split('.')[-1]} ({name})",
        "",
        f"torch {torch.__version__}, {datetime.date.today()}. Median of {args.iters} calls (CUDA events on the GPU, "
        "one process alone: not emulated). concatenated: to_k, to_v, stack, cat with the other patches' K/V, "
        "attention. whole buffer (f15cd96): the projections write this patch's part of one (P, tokens, batch, 2, "
        "inner) buffer that attention reads in place. K/V-major (now): the same in place with the buffer (2, batch, "
        "P, tokens, inner), contiguous GEMM outputs, the layout a concatenation gives attention (Note [kv slots]). "
        "ratio: over "
        "concatenated; diff: max |difference| of the outputs from concatenated's.",
        "",
        "| shape | P | tokens/patch | concatenated (ms) | whole buffer (ms) | ratio | diff | K/V-major (ms) | ratio "
        "| diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        major = f"{r['k_v_major_ms']:.3f} | {r['k_v_major_ratio']:.3f} | {r['k_v_major_max_abs_diff']:.2g}"
        lines.append(
            f"| {r['shape']} | {r['patches']} | {r['tokens_per_patch']} | {r['concatenated_ms']:.3f} | "
            f"{r['whole_buffer_ms']:.3f} | {r['ratio']:.3f} | {r['max_abs_diff']:.2g} | {major} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "patch_attention_" + name.replace(" ", "_"))
        meta = {"device": name, "torch": torch.__version__, "date": str(datetime.date.today()), "dtype": str(dtype)}
        write_results(stem, {"meta": meta, "rows": rows}, lambda _: text)


if __name__ == "__main__":
    main()
