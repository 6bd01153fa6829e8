"""The test oracle for the partitioner (tests/test_partition.py): every cut tried, exponentially."""

from __future__ import annotations

import itertools

import numpy as np

from asyncdiff_rt.compiler.partition import _leaf_consumers
from asyncdiff_rt.compiler.trace import Trace


def brute_force(
    order: list[str],
    cost_ms: dict[str, float],
    trace: Trace,
    model_n: int,
    bandwidth_Bps: float | None = None,
    keep_head_tail: bool = False,
    limit: float | None = None,
) -> float:
    """For tests (exponential): the optimal slowest-segment time over every cut; with ``limit``, the least bytes
    moved (DP's count) over the cuts whose slowest segment takes at most ``limit`` ms."""
    n = len(order)
    sources = trace.output_sources() & set(order)
    leaves = _leaf_consumers(trace, set(order))
    best = np.inf
    heads = range(1, n) if keep_head_tail and model_n > 1 else [0]
    for h in heads:
        rotated = order[h:] + order[:h]
        for inner in itertools.combinations(range(1, n), model_n - 1):
            cuts = [0, *inner, n]
            segs = [rotated[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            if not sources <= set(segs[-1]):
                continue
            worst, total_moved = 0.0, 0
            for seg in segs:
                s = set(seg)
                moved = 0
                for (src, _leaf), (nbytes, consumers) in leaves.items():
                    cons = consumers - {src}
                    if cons and src not in s and cons & s:
                        moved += nbytes
                    if cons and src in s and not cons <= s:
                        moved += nbytes
                t = sum(cost_ms[b] for b in seg) + (moved / bandwidth_Bps * 1e3 if bandwidth_Bps else 0.0)
                worst = max(worst, t)
                total_moved += moved
            if limit is None:
                best = min(best, worst)
            elif worst <= limit:
                best = min(best, total_moved)
    return float(best)
