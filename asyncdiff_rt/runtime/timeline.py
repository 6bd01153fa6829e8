"""Per-rank timelines of compute and communication, to see the overlap (DESIGN §5).

Spans are timed on the rank's compute stream with CUDA events on a GPU (host clocks on a CPU): "compute" is the
rank's forward, "exchange" and "ε" are the time its compute stream waits for the block outputs and ε to arrive,
i.e. the communication that is *not* hidden. `AsyncDiff.record_timeline()` switches recording on for the next
pipeline call; `AsyncDiff.gather_timeline()` collects every rank's spans on every rank; `draw_timeline` plots them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Timeline", "draw_timeline"]


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self._spans: list[tuple[str, int, str, Any, Any]] = []

    def clear(self) -> None:
        self._spans = []

    @contextmanager
    def span(self, kind: str, step: int, lane: str = "compute"):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._spans.append((kind, step, lane, start, end))

    def intervals(self) -> list[dict[str, Any]]:
        """Spans as {kind, step, lane, start_ms, end_ms}, relative to this rank's first span."""
        if not self._spans:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            base = self._spans[0][3]
            times = [(base.elapsed_time(s), base.elapsed_time(e)) for _, _, _, s, e in self._spans]
        else:
            base = self._spans[0][3]
            times = [((s - base) * 1e3, (e - base) * 1e3) for _, _, _, s, e in self._spans]
        return [
            {"kind": kind, "step": step, "lane": lane, "start_ms": t0, "end_ms": t1}
            for (kind, step, lane, _, _), (t0, t1) in zip(self._spans, times)
        ]


def draw_timeline(per_rank: list[list[dict[str, Any]]], path: str, title: str = "asyncdiff_rt timeline") -> None:
    """One row per rank and lane; bars coloured by kind, labelled with the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"warm-up": "#bbbbbb", "compute": "#4477aa", "exchange": "#ee6677", "ε": "#ccbb44"}
    rows = [(rank, lane) for rank, spans in enumerate(per_rank) for lane in sorted({s["lane"] for s in spans})]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.2))
    for y, (rank, lane) in enumerate(rows):
        for s in per_rank[rank]:
            if s["lane"] != lane:
                continue
            width = max(s["end_ms"] - s["start_ms"], 1e-3)
            ax.barh(y, width, left=s["start_ms"], color=colors.get(s["kind"], "#999999"), edgecolor="white")
            if width > 0.04 * max(x["end_ms"] for x in per_rank[rank]):
                ax.text(s["start_ms"] + width / 2, y, str(s["step"]), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"rank {r} {lane}" for r, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms (each rank from its own first span)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
