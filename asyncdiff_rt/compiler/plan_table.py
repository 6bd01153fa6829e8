"""The plan table `asyncdiff-rt plan` prints: per segment its blocks, measured cost, share and boundary bytes."""

from __future__ import annotations

from .plan import Plan

__all__ = ["format_plan_table"]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _runs(blocks: list[str], order: list[str] | None) -> str:
    """'first .. last' per run of consecutive blocks in call order (a head+tail segment has two runs)."""
    if not blocks:
        return "-"
    if not order:
        return blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]}"
    pos = {b: i for i, b in enumerate(order)}
    idx = sorted(pos[b] for b in blocks if b in pos)
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b is None or b != a + 1:
            runs.append((start, a))
            if b is not None:
                start = b
    # a wrap-around segment reads tail first, then head: the order the rotated plan executes it in
    if len(runs) == 2 and runs[0][0] == 0 and runs[1][1] == len(order) - 1:
        runs = runs[::-1]
    return " + ".join(order[a] if a == b else f"{order[a]} .. {order[b]}" for a, b in runs)


def format_plan_table(plan: Plan) -> str:
    """Segment, #blocks, first..last block, ms, share %, bytes in, bytes out, weights; then split quality."""
    order = plan.meta.get("order")
    costs = [s.cost_ms for s in plan.segments]
    total = sum(c for c in costs if c is not None) or None
    rows = [("segment", "#blocks", "blocks (first .. last)", "ms", "share %", "bytes in", "bytes out", "weights")]
    for i, s in enumerate(plan.segments):
        share = f"{100 * s.cost_ms / total:.1f}" if total and s.cost_ms is not None else "-"
        rows.append(
            (
                f"S{i}",
                str(len(s.blocks)),
                _runs(s.blocks, order),
                f"{s.cost_ms:.3f}" if s.cost_ms is not None else "-",
                share,
                _fmt_bytes(s.bytes_in),
                _fmt_bytes(s.bytes_out),
                _fmt_bytes(s.weight_bytes),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6, 7}
    lines = []
    for k, r in enumerate(rows):
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    head = []
    m = plan.meta
    if m:
        desc = [m.get("arch", "").split(":")[0]]
        if m.get("height"):
            desc.append(f"{m['height']}x{m['width']}")
        if m.get("batch"):
            desc.append(f"batch {m['batch']}")
        for k in ("dtype", "device", "granularity", "cost_model", "balance"):
            if m.get(k):
                desc.append(str(m[k]))
        desc = [d for d in desc if d]
        head.append(f"Plan {plan.hash()}" + (": " + ", ".join(desc) if desc else ""))
    q = plan.split_quality()
    tail = []
    if q is not None:
        tail.append(
            f"split quality sum/max = {q:.3f} (ideal {plan.model_n}); slowest segment {max(costs):.3f} ms "
            f"of {total:.3f} ms"
        )
    if m.get("denoiser_ms"):
        tail.append(f"whole denoiser measured at {m['denoiser_ms']:.3f} ms (blocks sum {total:.3f} ms)")
    if m.get("keep_head_tail"):
        tail.append(f"head and tail kept together (head = first {m.get('head_blocks')} block(s) in call order)")
    return "\n".join(head + lines + tail)
