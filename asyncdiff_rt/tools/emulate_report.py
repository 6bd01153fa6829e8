"""The arithmetic and the table of `bench --emulate` (tools/emulate.py): speed-ups, the ideal, the efficiency, the
per-round breakdown of a recorded timeline, and the markdown. Pure functions of plain data (tested on CPU)."""

from __future__ import annotations

from typing import Any

from .bench_report import failure_cell

__all__ = ["ideal", "breakdown", "summarize", "markdown", "label", "failed_row"]

PARTS = ("wall_ms", "compute_ms", "exchange_ms", "eps_ms", "gap_ms")


def ideal(steps: int, warm_up: int, s: float, stride: int = 1, cfg: bool = False) -> float:
    """K / (W + (K - W) / (stride * s)): W exact steps, then rounds as long as the slowest of segments that split
    one step's work s ways (s = sum / max of the segment costs), one round per `stride` steps; x2 with CFG
    parallelism (each process computes one guidance half)."""
    w = min(warm_up, steps)
    value = steps / (w + (steps - w) / (stride * s))
    return 2 * value if cfg else value


def breakdown(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean per asynchronous round of one rank's recorded call: the round's wall time on the compute stream (from
    its first span to the next round's), compute, exposed exchange, ε, and host gaps = wall - the three others.
    A round is one step at stride 1, two at stride 2. None when the call had no asynchronous round."""
    rounds = sorted({s["step"] for s in spans if s["kind"] == "compute"})
    if not rounds:
        return None
    per = {k: [s for s in spans if s["step"] == k and s["kind"] != "warm-up"] for k in rounds}
    start = {k: min(s["start_ms"] for s in per[k]) for k in rounds}
    used = rounds[:-1] if len(rounds) > 1 else rounds  # the last round has no next one to end its wall time
    sums = dict.fromkeys(PARTS, 0.0)
    for i, k in enumerate(used):
        wall = start[rounds[i + 1]] - start[k] if len(rounds) > 1 else max(s["end_ms"] for s in per[k]) - start[k]
        part = {kind: sum(s["end_ms"] - s["start_ms"] for s in per[k] if s["kind"] == kind)
                for kind in ("compute", "exchange", "ε")}  # fmt: skip
        sums["wall_ms"] += wall
        sums["compute_ms"] += part["compute"]
        sums["exchange_ms"] += part["exchange"]
        sums["eps_ms"] += part["ε"]
        sums["gap_ms"] += wall - part["compute"] - part["exchange"] - part["ε"]
    return {"rounds": len(used), **{k: v / len(used) for k, v in sums.items()}}


def failed_row(name: str, procs: int, pct: int, result: dict[str, Any]) -> str:
    """The row of a variant that failed, in the emulation tables' 11 columns."""
    cells = [label(name, procs, pct), result.get("what", ""), f"failed: {failure_cell(result['error'])}"] + [""] * 8
    return "| " + " | ".join(cells) + " |"


def label(name: str, procs: int, pct: int) -> str:
    return (
        f"{name} (emulated: {procs} process{'es' if procs > 1 else ''} on one GPU under MPS at {pct} % of the SMs each)"
    )


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in, for every emulation entry, each variant's speed-ups over `one` and over the control mean, s, the
    ideal and the efficiency (speed-up over the control / ideal); in place, returns `data`."""
    for entry in data["emulations"].values():
        rows, K = entry["variants"], entry["steps"]
        one = rows.get("one", {}).get("median_s")
        control = rows.get("control", {}).get("mean_s")
        for name, r in rows.items():
            if "median_s" not in r:
                continue
            r["label"] = label(name, r["procs"], entry["percent"])
            t = r.get("mean_s", r["median_s"])
            r["vs_one"] = one / t if one else None
            r["vs_control"] = control / t if control else None
            if name in ("one", "control"):
                r["s"] = r["ideal"] = r["efficiency"] = None
                continue
            s, r["s_note"] = r.get("split_quality"), None
            if r["model_n"] == 1:
                s = 1.0
            elif s is None:
                s, r["s_note"] = float(r["model_n"]), "the plan has no segment costs: s = model_n"
            r["s"] = s
            r["ideal"] = ideal(K, r["warm_up"], s, r["stride"], r["cfg_parallel"])
            r["efficiency"] = r["vs_control"] / r["ideal"] if r["vs_control"] else None
            r["cfg_ceiling"] = _cfg_ceiling(r, rows.get("control"))
    return data


def _compute(row: dict[str, Any] | None, slowest: bool = False) -> float | None:
    """Rank 0's compute per round (slowest: the largest of every rank's), None without a breakdown."""
    parts = [b for b in ((row or {}).get("breakdown") or {}).values() if b]
    if not parts:
        return None
    return max(b["compute_ms"] for b in parts) if slowest else parts[0]["compute_ms"]


def _cfg_ceiling(row: dict[str, Any], control: dict[str, Any] | None) -> dict[str, float] | None:
    """What a CFG split can give at this share, from compute alone: `gain` = the control's compute per step (the
    whole guidance batch) split s ways, over the slowest rank's (its segment of one half); `bound` = gain x the
    segments' ideal (ideal / 2). The gain is below 2 where the GPU's time for half the batch is more than half its
    time for the whole (kernels that no longer fill the SMs): no exchange can recover that."""
    if not row.get("cfg_parallel") or not row.get("ideal"):
        return None
    half, whole = _compute(row, slowest=True), _compute(control)
    if not half or not whole:
        return None
    gain = whole / (row["s"] * half)
    return {"half_ms": half, "whole_ms": whole, "gain": gain, "bound": gain * row["ideal"] / 2}


def _cfg_note(name: str, row: dict[str, Any]) -> str | None:
    c, got = row.get("cfg_ceiling"), row.get("vs_control")
    if not c or not got:
        return None
    split = f" split {row['s']:.2f} ways {c['whole_ms'] / row['s']:.1f} ms" if row["model_n"] > 1 else ""
    bound = f" x the segments' ideal {row['ideal'] / 2:.2f}x = {c['bound']:.2f}x" if row["model_n"] > 1 else ""
    return (
        f"{name}: each rank computes its part of one guidance half in {c['half_ms']:.1f} ms per step, the control's "
        f"whole batch takes {c['whole_ms']:.1f} ms{split}: the batch split gains {c['gain']:.2f}x here, not 2; "
        f"bound {c['gain']:.2f}x{bound} over the control; measured {got:.2f}x = {got / c['bound']:.2f} of it."
    )


_HOW = {"shm": "through host memory", "ipc": "device memory shared through CUDA IPC", "nccl": "NCCL"}


def _x(v: float | None, fmt: str = "{:.2f}x") -> str:
    return "–" if v is None else fmt.format(v)


def _parts(b: dict[str, Any] | None) -> str:
    if not b:
        return "–"
    return " / ".join(f"{b[k]:.1f}" for k in PARTS)


def _balance_note(name: str, row: dict[str, Any]) -> str | None:
    """Every rank's compute per round beside the plan's segment costs (what an uneven split looks like)."""
    ranks = sorted(((row.get("breakdown") or {}).items()), key=lambda kv: int(kv[0].split()[-1]))
    if len(ranks) < 3 or not all(b for _, b in ranks):
        return None
    measured = " / ".join(f"{b['compute_ms']:.1f}" for _, b in ranks)
    plan = row.get("segment_ms") or []
    planned = " / ".join("–" if c is None else f"{c:.1f}" for c in plan) if plan else "–"
    return f"{name}: compute per round by rank {measured} ms; the plan's segment costs {planned} ms."


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines: list[str] = []
    for key in sorted(data["emulations"], key=int):
        e = data["emulations"][key]
        n, pct, K = e["n"], e["percent"], e["steps"]
        size = f" at {e['size']} px" if e.get("size") else ""
        size += f", {e['dtype']}" if e.get("dtype") else ""
        kind = e.get("transport") or meta.get("transport", "shm")  # entries older than the ipc transport: shm
        lines += [
            f"# {meta['model']}{size}, {K} steps — emulated: {n} processes on one GPU under MPS at {pct} % of the SMs "
            f"each ({meta['device']})",
            "",
            f"torch {meta['torch']}, diffusers {meta['diffusers']}, {e['date']}. Loop median of {e['runs']} runs of "
            f"{K} steps after one untimed warm-up call; multi-process variants exchange over "
            f"`{kind}` ({_HOW.get(kind, kind)}; a `_<kind>` suffix: over that transport instead). vs one / vs "
            "control: speed-up over `one` / over the control mean. s: the plan's split quality "
            "(sum / max of segment costs). ideal: K / (W + (K - W) / (stride s)), x2 with cfg_parallel. efficiency: "
            "vs control / ideal. Per round (one step at stride 1, two at stride 2), from one recorded call: "
            "wall / compute / exposed exchange / ε / host gaps, in ms.",
            "",
            "| variant | what | loop median (s) | min–max (s) | vs one | vs control | s | ideal | efficiency "
            f"| rank 0 per round (ms) | rank {n - 1} per round (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in e["variants"].items():
            if "median_s" not in r:
                lines.append(failed_row(name, n, pct, r))
                continue
            b = r.get("breakdown") or {}
            last = b.get(f"rank {n - 1}") if name not in ("one", "control") else None
            t = r.get("mean_s", r["median_s"])
            lines.append(
                f"| {r.get('label') or label(name, r['procs'], pct)} | {r['what']} | {t:.3f} "
                f"| {r['min_s']:.3f}–{r['max_s']:.3f} | {_x(r.get('vs_one'))} | {_x(r.get('vs_control'))} "
                f"| {_x(r.get('s'), '{:.2f}')} | {_x(r.get('ideal'))} | {_x(r.get('efficiency'), '{:.2f}')} "
                f"| {_parts(b.get('rank 0'))} | {_parts(last)} |"
            )
        control = e["variants"].get("control", {})
        if "medians_s" in control:
            each = ", ".join(f"{m:.3f}" for m in control["medians_s"])
            lines += ["", f"control: each process's median {each} s; mean {control['mean_s']:.3f} s (its row)."]
        notes = [f"{name}: {r['s_note']}" for name, r in e["variants"].items() if r.get("s_note")]
        for note_of in (_balance_note, _cfg_note):  # each made once per variant; None where it does not apply
            notes += [n for n in (note_of(name, r) for name, r in e["variants"].items()) if n]
        notes += [f"{name}: {note}" for name, note in (e.get("skipped") or {}).items()]
        if notes:
            lines += ["", *notes]
        lines.append("")
    return "\n".join(lines)
