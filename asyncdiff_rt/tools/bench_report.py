"""The table and the chart of `asyncdiff-rt bench` (tools/bench.py): pure functions of the results file's data."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown", "chart", "batch_text", "failure_cell"]


def failure_cell(error: str) -> str:
    """A failed variant's error in one table cell: one line (a worker error spans several), no column breaks,
    long enough to reach the root cause (the JSON keeps the whole text)."""
    return " ".join(error.split()).replace("|", "/")[:400]


def batch_text(meta: dict[str, Any]) -> str:
    """How the denoiser is called each step: a CFG batch of 2, or FLUX.1's batch of 1 with a guidance vector."""
    if meta.get("cfg", True):
        return f"batch {meta.get('batch', 2)} (CFG)"
    return f"batch {meta.get('batch', 1)} (guidance-distilled: no CFG batch)"


def markdown(data: dict[str, Any], order: tuple[str, ...]) -> str:
    """The results table: one-process variants in `order`, then the several-GPU ones (one process per GPU)."""
    meta, rows = data["meta"], data["variants"]
    base = rows.get("eager", {}).get("median_s")
    floor = rows.get("graph_floor", {}).get("median_s")
    dtype = meta.get("dtype", "float16")
    lines = [
        f"# {meta['model']} at {meta['size']} px, {meta['steps']} steps, {batch_text(meta)}, {dtype} — "
        f"{meta['device']}",
        "",
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}. Median of {meta['runs']} runs after "
        "one warm run; first call = capture/compile included.",
        "",
        "| variant | loop median (s) | min–max (s) | per step (ms) | vs eager | vs graph floor | first call (s) "
        "| peak mem (GiB) | max abs diff vs eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for name in order:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {failure_cell(r['error'])} | | | | | | | |")
            continue
        med = r["median_s"]
        peak = r.get("peak_mem_gib")
        vs_eager = f"{base / med:.2f}x" if base else "–"  # a baseline not measured in this file
        vs_floor = f"{floor / med:.3f}" if floor else "–"
        lines.append(
            f"| {name} | {med:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | {med / meta['steps'] * 1000:.2f} | "
            f"{vs_eager} | {vs_floor} | {r['first_call_s']:.1f} | "
            f"{'–' if peak is None else f'{peak:.1f}'} | {r.get('max_abs_vs_eager', nan):.3g} |"
        )
    ours1 = rows.get("ours_n1", {}).get("median_s")
    multi = [(n, r) for n, r in rows.items() if "median_s" in r and r.get("one_gpu") is False]
    if multi:
        lines += [
            "",
            "Several GPUs, one process per GPU (nccl): speed-up over our own model_n=1 and efficiency against the "
            "ideal K / (W + (K - W) / n).",
            "",
            "| variant | n | stride | W | loop (s) | vs eager | vs ours n=1 | ideal | efficiency | weights GiB/rank |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        K = meta["steps"]
        for name, r in sorted(multi):
            n, w = r["model_n"], r["warm_up"]
            ideal = K / (w + (K - w) / n)
            speed = ours1 / r["median_s"] if ours1 else nan
            weights = "/".join(f"{g:.2f}" for g in r["param_gib_per_rank"])
            lines.append(
                f"| {name} | {n} | {r['stride']} | {w} | {r['median_s']:.3f} | "
                f"{base / r['median_s'] if base else nan:.2f}x | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} "
                f"| {weights} |"
            )
    if "vae_decode_ms" in rows.get("eager", {}):
        lines += ["", f"VAE decode (one image, separately): {rows['eager']['vae_decode_ms']:.1f} ms"]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: str, order: tuple[str, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(n, data["variants"][n]["median_s"]) for n in order if "median_s" in data["variants"].get(n, {})]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="#4477aa")
    ax.set_xlabel(f"{data['meta']['steps']}-step loop latency (s)")
    ax.set_title(f"{data['meta']['model']} {data['meta']['size']} px on {data['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
