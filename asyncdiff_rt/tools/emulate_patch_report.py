"""The arithmetic and the tables of `bench --emulate N --strategy patch` (tools/emulate_patch.py): speed-ups over
`one` and the control (loop and steady step), the bytes each rank sends per step against DistriFusion's all-gather,
the PSNR against `one`, the issue's targets, and "segments vs patches vs CFG". Pure functions of plain data."""

from __future__ import annotations

import math
from typing import Any

from .emulate_report import failed_row, label

__all__ = ["summarize", "markdown", "sent_bytes", "TARGETS"]

# issue 17, "done when": at 2048 px, corrected_async_gn over the control; its step at most 1.05x no_sync's
TARGETS = {2: 1.85, 4: 3.4}
STEP_RATIO_MAX = 1.05
REFERENCE_MODE = "patch_corrected_async_gn"  # DistriFusion's default mode: its bytes are the reference


def sent_bytes(b: dict[str, int]) -> int:
    """What one rank sends per steady step: halos, K/V, moments and its ε rows."""
    return b["halo"] + b["kv"] + b["gn"] + b["output"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _family(name: str) -> str | None:
    if name.startswith("patch_"):
        return None if name == "patch_naive" else "patches"  # naive is a baseline, not a choice
    if name.startswith("ours_n"):
        return "segments"
    if name.startswith("cfg"):
        return "CFG"
    return None


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in every entry's speed-ups, bytes, the DistriFusion reference, the targets and the best variant of
    each family; in place, returns `data`."""
    for entry in data["emulations"].values():
        rows, n = entry["variants"], entry["n"]
        one, control = rows.get("one", {}), rows.get("control", {})
        df = None
        for name in [REFERENCE_MODE, *rows]:
            per_rank = rows.get(name, {}).get("bytes_per_rank")
            if per_rank and any(b.get("distrifusion") for b in per_rank):
                df = max(b["distrifusion"] + b["output"] for b in per_rank)
                entry["distrifusion_from"] = name
                break
        entry["distrifusion_bytes"] = df
        best: dict[str, str] = {}
        for name, r in rows.items():
            if "median_s" not in r:
                continue
            r["label"] = label(name, r["procs"], entry["percent"])
            t = r.get("mean_s", r["median_s"])
            r["vs_one"] = _ratio(one.get("median_s"), t)
            r["vs_control"] = _ratio(control.get("mean_s"), t)
            r["step_vs_control"] = _ratio(control.get("step_ms"), r.get("step_ms"))
            if r.get("bytes_per_rank"):
                busiest = max(r["bytes_per_rank"], key=sent_bytes)
                r["sent_bytes"], r["sent_split"] = sent_bytes(busiest), busiest
                r["vs_distrifusion"] = r["sent_bytes"] / df if df else None
            family = _family(name)
            if family and (family not in best or t < rows[best[family]].get("mean_s", rows[best[family]]["median_s"])):
                best[family] = name
        entry["best"] = best
        corrected, no_sync = rows.get(REFERENCE_MODE, {}), rows.get("patch_no_sync", {})
        entry["checks"] = {
            "target_vs_control": TARGETS.get(n),
            "corrected_vs_control": corrected.get("vs_control"),
            "corrected_step_over_no_sync": _ratio(corrected.get("step_ms"), no_sync.get("step_ms")),
            "step_ratio_max": STEP_RATIO_MAX,
            "corrected_finite": _finite(corrected),
        }
    return data


def _finite(r: dict[str, Any]) -> bool | None:
    """Whether a variant's final latents were finite (a NaN PSNR: not); None without a fidelity record."""
    f = r.get("fidelity")
    return None if not f else not math.isnan(f["psnr_db"])


def _x(v: float | None, fmt: str = "{:.2f}x") -> str:
    return "–" if v is None else fmt.format(v)


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e6:.1f}"


def _psnr(r: dict[str, Any]) -> str:
    f = r.get("fidelity")
    if not f:
        return "–"
    return "exact" if math.isinf(f["psnr_db"]) else f"{f['psnr_db']:.1f}"


def _split(r: dict[str, Any]) -> str:
    b = r.get("sent_split")
    return "–" if not b else " / ".join(_mb(b[k]) for k in ("halo", "kv", "gn", "output"))


def _graphs(r: dict[str, Any]) -> str:
    captures = r.get("captures")
    return "–" if captures is None else ("eager" if not any(captures) else f"{max(captures)} graphs")


def _kv_path(r: dict[str, Any]) -> str:
    puts = r.get("kv_puts")
    return "–" if not puts else ("puts" if all(puts) else "slots")


def _header(meta: dict[str, Any], e: dict[str, Any]) -> list[str]:
    n, pct, K = e["n"], e["percent"], e["steps"]
    return [
        f"# {meta['model']} at {e['size']} px, {K} steps, PatchParallel — emulated: {n} processes on one GPU under MPS "
        f"at {pct} % of the SMs each ({meta['device']})",
        "",
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {e['date']}. {K} steps (fewer than a real run's 50, "
        f"to fit the device budget), PatchParallel warm_up={e['warm_up']}; loop median of {e['runs']} timed run(s) "
        "after one shorter untimed call (graph capture). Multi-process variants exchange over "
        f"`{meta.get('transport', 'shm')}`. vs one / vs control: loop speed-up over `one` / over the control mean. "
        "step: mean wall time of the "
        "steps after the warm-up (CUDA events on rank 0); step vs control: the same ratio per step (what 50 steps "
        "approach). sent/step: bytes the busiest rank sends per steady step (halo / K,V / GN moments / ε rows, MB); "
        "vs DistriFusion: over what distrifuser's all-gather sends per rank and step (both boundaries of every 3x3 "
        "convolution, the whole K/V of every self-attention and every GroupNorm's moments to every other rank, plus "
        "the ε rows). PSNR: of the final latents against `one`'s, data range `one`'s (random weights: a "
        "consistency check, not a quality claim). graphs: CUDA graphs captured per rank (eager: none). K/V: puts "
        "straight into the peers' buffers (Note [K/V puts] in strategies/patches/exchange.py) or through the "
        "exchange slots (–: not recorded, runs before 2026-12-08).",
        "",
    ]


def _table(e: dict[str, Any]) -> list[str]:
    n, pct = e["n"], e["percent"]
    lines = [
        "| variant | what | loop median (s) | vs one | vs control | step (ms) | step vs control | sent/step (MB) "
        "| vs DistriFusion | PSNR vs one (dB) | graphs | K/V |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in e["variants"].items():
        if "median_s" not in r:
            lines.append(failed_row(name, n, pct, r))
            continue
        t = r.get("mean_s", r["median_s"])
        lines.append(
            f"| {r['label']} | {r['what']} | {t:.3f} | {_x(r.get('vs_one'))} | {_x(r.get('vs_control'))} "
            f"| {_x(r.get('step_ms'), '{:.1f}')} | {_x(r.get('step_vs_control'))} | {_split(r)} "
            f"| {_x(r.get('vs_distrifusion'))} | {_psnr(r)} | {_graphs(r)} | {_kv_path(r)} |"
        )
    return lines


def _notes(e: dict[str, Any]) -> list[str]:
    out = []
    df = e.get("distrifusion_bytes")
    if df:
        out.append(f"DistriFusion's all-gather per rank and step: {_mb(df)} MB (from the registry of "
                   f"{e['distrifusion_from']}).")  # fmt: skip
    c = e["checks"]
    if c["corrected_vs_control"] is not None and c["target_vs_control"]:
        met = (
            "met" if c["corrected_vs_control"] >= c["target_vs_control"] else "NOT met"
        ) + " at this size and step count"
        if c.get("corrected_finite") is False:  # a speed of wrong latents counts for nothing
            met = "NOT counted: its latents are not finite"
        out.append(f"corrected_async_gn over the control: {c['corrected_vs_control']:.2f}x (issue 17's target at "
                   f"2048 px: >= {c['target_vs_control']}x, {met}).")  # fmt: skip
    if c["corrected_step_over_no_sync"] is not None:
        met = "met" if c["corrected_step_over_no_sync"] <= c["step_ratio_max"] else "NOT met"
        if c.get("corrected_finite") is False:
            met = "NOT counted: its latents are not finite"
        out.append(f"corrected_async_gn step / no_sync step: {c['corrected_step_over_no_sync']:.3f} (target <= "
                   f"{c['step_ratio_max']}, {met}).")  # fmt: skip
    control = e["variants"].get("control", {})
    if "medians_s" in control:
        each = ", ".join(f"{m:.3f}" for m in control["medians_s"])
        out.append(f"control: each process's median {each} s; mean {control['mean_s']:.3f} s (its row).")
    return [x for line in out for x in ("", line)]


def _comparison(e: dict[str, Any]) -> list[str]:
    best = e.get("best", {})
    if len(best) < 2:
        return []
    lines = [
        "",
        f"## Segments vs patches vs CFG: the fastest of each at {e['size']} px, N = {e['n']}",
        "",
        "| family | variant | loop median (s) | vs control | step vs control | PSNR vs one (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for family in ("segments", "patches", "CFG"):
        name = best.get(family)
        if name is None:
            continue
        r = e["variants"][name]
        lines.append(f"| {family} | {name} | {r['median_s']:.3f} | {_x(r.get('vs_control'))} "
                     f"| {_x(r.get('step_vs_control'))} | {_psnr(r)} |")  # fmt: skip
    lines += ["", "patches: the fastest sync mode but `naive` (a baseline whose patches never meet)."]
    return lines


def markdown(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for key in sorted(data["emulations"], key=int):
        e = data["emulations"][key]
        lines += _header(data["meta"], e) + _table(e) + _notes(e) + _comparison(e) + [""]
    return "\n".join(lines)
