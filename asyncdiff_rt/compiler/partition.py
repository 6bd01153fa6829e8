"""Partition the blocks' call order into ``model_n`` contiguous segments (docs/architecture.md).

Objective: minimise the slowest segment's time, where a segment's time is its compute (sum of its blocks' costs)
plus, when a bandwidth is given, its exposed boundary transfer ``(bytes_in + bytes_out) / bandwidth`` — sends and
receives counted together, as a conservative model of one link per GPU. Among plans whose slowest segment is
within ``slack`` (relative; default 0, i.e. optimal to 1e-9) of the optimum, a second pass picks the one moving the
fewest boundary bytes, so cuts land on thin edges even when no bandwidth is given; ``slack=0.02`` trades up to 2%
of the slowest segment for fewer bytes across boundaries.

Bytes, per step: a segment's ``bytes_in`` is every output leaf of a block outside it that a block inside reads
(each leaf once); ``bytes_out`` in the dynamic programme counts every leaf it produces that is read outside (each
leaf once — the per-destination count depends on the other cuts), while the ``Segment.bytes_out`` reported in
the plan counts a leaf once per consuming segment (what point-to-point sends move). Edges from the denoiser's
inputs are replicated code, never sent.

Constraint: the last segment owns every block the denoiser's output derives from (docs/strategies.md: ε is computed on
S_{n-1}'s rank).

``keep_head_tail=True``: the high-resolution head and tail share one segment, as the reference does for SDXL.
That segment is not contiguous in call order, so we rotate: the order becomes ``order[h:] + order[:h]`` and the
last segment (which ends with the rotated head, and holds the tail with the output block) wraps around. Every
head length h >= 1 is tried and the best plan kept; segments are then S_0 = the first segment after the head,
..., S_{n-1} = tail + head, each listing its blocks in call order (head blocks first in S_{n-1}).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .plan import Plan, Segment
from .trace import INPUT, OUTPUT, Trace

__all__ = ["partition", "range_costs", "segment_bytes", "PartitionResult"]

_REL_TOL = 1e-9


class PartitionResult:
    """What the search found: segment boundaries as index ranges into ``order`` (rotated by ``head``), the
    slowest segment's time in ms and the boundary bytes the DP counted."""

    def __init__(self, order: list[str], cuts: list[tuple[int, int]], objective_ms: float, moved: float, head: int):
        self.order, self.cuts, self.objective_ms, self.moved, self.head = order, cuts, objective_ms, moved, head


def _leaf_consumers(trace: Trace, names: set[str]) -> dict[tuple[str, int], tuple[int, set[str]]]:
    """(src, leaf) -> (bytes of that leaf, consuming blocks), over blocks in ``names``."""
    out: dict[tuple[str, int], tuple[int, set[str]]] = {}
    for e in trace.edges:
        if e.src == INPUT or e.dst == OUTPUT or e.src not in names or e.dst not in names:
            continue
        outputs = trace.blocks[e.src].outputs
        for leaf in e.leaves:
            info = outputs[leaf] if 0 <= leaf < len(outputs) else None
            nbytes = info.nbytes if info is not None else 0
            entry = out.setdefault((e.src, leaf), (nbytes, set()))
            entry[1].add(e.dst)
    return out


def _arc_costs(order: list[str], cost_ms: dict[str, float], trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Costs of every circular arc of ``order``: index [a, L] is the arc of L blocks starting at position a
    (wrapping around). Compute ms, bytes in, bytes out (each leaf once). Shape (N, N+1)."""
    n = len(order)
    pos = {b: i for i, b in enumerate(order)}
    c = np.array([float(cost_ms.get(b, 0.0)) for b in order])
    prefix = np.concatenate([[0.0], np.cumsum(np.concatenate([c, c]))])
    a_idx = np.arange(n)[:, None]
    lengths = np.arange(n + 1)[None, :]
    compute = prefix[a_idx + lengths] - prefix[a_idx]
    bytes_in = np.zeros((n, n + 1))
    bytes_out = np.zeros((n, n + 1))
    starts = np.arange(n)
    for (src, _leaf), (nbytes, consumers) in _leaf_consumers(trace, set(order)).items():
        qs = np.array(sorted(pos[q] for q in consumers if q != src))
        if nbytes == 0 or qs.size == 0:
            continue
        # distance from the arc's start, going forward: x is in arc (a, L) iff (x - a) mod N < L
        d_p = (pos[src] - starts) % n
        d_q = (qs[None, :] - starts[:, None]) % n
        producer_in = d_p[:, None] < lengths
        any_in = d_q.min(axis=1)[:, None] < lengths
        all_in = d_q.max(axis=1)[:, None] < lengths
        bytes_in += nbytes * (~producer_in & any_in)
        bytes_out += nbytes * (producer_in & ~all_in)
    return compute, bytes_in, bytes_out


def _ranges(arc: np.ndarray, head: int) -> np.ndarray:
    """Arc matrix -> range matrix [i, j) of the order rotated by ``head`` (shape (N+1, N+1); inf where j < i)."""
    n = arc.shape[0]
    i_idx = np.arange(n + 1)[:, None]
    j_idx = np.arange(n + 1)[None, :]
    length = np.clip(j_idx - i_idx, 0, n)
    out = arc[(head + i_idx) % n, length]
    return np.where(j_idx >= i_idx, out, np.inf)


def range_costs(order: list[str], cost_ms: dict[str, float], trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matrices over ranges [i, j) of ``order`` (shape (N+1, N+1)): compute ms, bytes in, bytes out (each leaf
    once)."""
    return tuple(_ranges(m, 0) for m in _arc_costs(order, cost_ms, trace))


def _pass1(time: np.ndarray, n_seg: int, last_start_max: int) -> float:
    """Least possible slowest-segment time over cuts 0 = c0 < c1 < ... < cn = N, the last segment starting at or
    before ``last_start_max`` (inf if none)."""
    n = time.shape[0] - 1
    if n_seg > n:
        return np.inf
    best = np.full((n_seg + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for k in range(1, n_seg + 1):
        for j in range(k, n + 1):
            best[k, j] = np.maximum(best[k - 1, :j], time[:j, j]).min()
    final = np.maximum(best[n_seg - 1, :n], time[:n, n])
    final[last_start_max + 1 :] = np.inf
    return float(final.min())


def _pass2(
    time: np.ndarray, weight: np.ndarray, n_seg: int, last_start_max: int, limit: float
) -> tuple[float, list[int]] | None:
    """Least total weight (boundary bytes) over cuts whose every segment takes at most ``limit``."""
    n = time.shape[0] - 1
    if n_seg > n:
        return None
    w = np.where(time <= limit, weight, np.inf)
    starts = np.arange(n + 1)
    least = np.full((n_seg + 1, n + 1), np.inf)
    arg = np.zeros((n_seg + 1, n + 1), dtype=int)
    least[0, 0] = 0.0
    for k in range(1, n_seg + 1):
        for j in range(k, n + 1):
            cand = least[k - 1, :j] + w[:j, j]
            if k == n_seg:
                cand = np.where(starts[:j] <= last_start_max, cand, np.inf)
            i = int(cand.argmin())
            least[k, j], arg[k, j] = cand[i], i
    if not np.isfinite(least[n_seg, n]):
        return None
    cuts = [n]
    j = n
    for k in range(n_seg, 0, -1):
        j = int(arg[k, j])
        cuts.append(j)
    return float(least[n_seg, n]), cuts[::-1]


class _Rotation:
    """The order rotated by ``head`` blocks, with its range matrices."""

    def __init__(self, order, arcs, sources, bandwidth_Bps, head):
        self.head = head
        self.order = order[head:] + order[:head]
        compute, b_in, b_out = (_ranges(m, head) for m in arcs)
        self.moved = b_in + b_out
        self.time = compute + self.moved / bandwidth_Bps * 1e3 if bandwidth_Bps else compute
        pos = {b: i for i, b in enumerate(self.order)}
        self.last_start_max = min((pos[s] for s in sources), default=len(order) - 1)


def segment_bytes(segments: list[list[str]], trace: Trace) -> list[tuple[int, int]]:
    """(bytes_in, bytes_out) per segment; bytes_out counts a leaf once per consuming segment."""
    owner = {b: i for i, seg in enumerate(segments) for b in seg}
    result = [[0, 0] for _ in segments]
    for (src, _leaf), (nbytes, consumers) in _leaf_consumers(trace, set(owner)).items():
        s = owner[src]
        readers = {owner[c] for c in consumers} - {s}
        for r in readers:
            result[r][0] += nbytes
        result[s][1] += nbytes * len(readers)
    return [tuple(x) for x in result]


def partition(
    order: list[str],
    cost_ms: dict[str, float],
    trace: Trace,
    model_n: int,
    bandwidth_Bps: float | None = None,
    keep_head_tail: bool = False,
    meta: dict[str, Any] | None = None,
    slack: float = 0.0,
) -> Plan:
    """The best contiguous partition of ``order`` into ``model_n`` segments (see the module docstring)."""
    order = list(order)
    n_blocks = len(order)
    if len(set(order)) != n_blocks:
        raise ValueError("partition: the block order lists a block twice")
    if isinstance(model_n, bool) or not isinstance(model_n, int) or not 1 <= model_n <= n_blocks:
        raise ValueError(
            f"model_n must be an integer from 1 to {n_blocks} (the number of blocks of this denoiser at this "
            f"granularity), got {model_n!r}"
        )
    missing = [b for b in order if b not in cost_ms]
    if missing:
        raise ValueError(f"partition: no cost for block(s) {missing[:5]}")
    if bandwidth_Bps is not None and bandwidth_Bps <= 0:
        raise ValueError(f"bandwidth_Bps must be positive, got {bandwidth_Bps}")
    if keep_head_tail and model_n == 1:
        keep_head_tail = False  # one segment holds everything anyway
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    heads = range(1, n_blocks) if keep_head_tail else [0]
    arcs = _arc_costs(order, cost_ms, trace)
    sources = trace.output_sources() & set(order)
    rotations = [_Rotation(order, arcs, sources, bandwidth_Bps, h) for h in heads]
    opt = min(_pass1(r.time, model_n, r.last_start_max) for r in rotations)
    if not np.isfinite(opt):
        raise ValueError(
            f"cannot cut {n_blocks} blocks into {model_n} segments with the last segment owning the output "
            f"block(s) {sorted(sources)}: use a smaller model_n"
        )
    limit = opt * (1 + max(slack, _REL_TOL)) + 1e-12
    best: PartitionResult | None = None
    for r in rotations:
        found = _pass2(r.time, r.moved, model_n, r.last_start_max, limit)
        if found is None:
            continue
        moved, cuts = found
        ranges = list(zip(cuts[:-1], cuts[1:]))
        worst = max(float(r.time[i, j]) for i, j in ranges)
        if best is None or (moved, worst) < (best.moved * (1 - _REL_TOL), best.objective_ms):
            best = PartitionResult(r.order, ranges, worst, moved, r.head)
    if best is None:  # cannot happen: the rotation that reached the optimum has a plan within the limit
        raise RuntimeError("partition: no plan within the optimum's limit")
    position = {b: i for i, b in enumerate(order)}
    segments_blocks = [sorted(best.order[i:j], key=position.__getitem__) for i, j in best.cuts]
    io = segment_bytes(segments_blocks, trace)
    segments = [
        Segment(
            blocks=blocks,
            cost_ms=float(sum(cost_ms[b] for b in blocks)),
            bytes_in=int(bi),
            bytes_out=int(bo),
        )
        for blocks, (bi, bo) in zip(segments_blocks, io)
    ]
    plan = Plan(segments=segments, meta=dict(meta or {}))
    plan.meta.setdefault("order", order)
    plan.meta.update(
        {
            "made_by": "asyncdiff_rt.compiler.partition",
            "objective_ms": best.objective_ms,
            "optimum_ms": opt,
            "slack": slack,
            "bandwidth_Bps": bandwidth_Bps,
            "keep_head_tail": bool(keep_head_tail),
            "head_blocks": best.head,
            "n_blocks": n_blocks,
            "total_ms": float(sum(cost_ms[b] for b in order)),
            "split_quality": plan.split_quality(),
        }
    )
    return plan
