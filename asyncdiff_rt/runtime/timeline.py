"""Per-rank timelines of compute and communication, to see the overlap (docs/architecture.md#timeline).

Spans are timed on the rank's compute stream with CUDA events on a GPU (the host's monotonic clock on a CPU):
"warm-up" is an exact step, "compute" the rank's forward, "exchange" and "ε" the time its compute stream waits for
the other segments' block outputs and for ε (the denoiser output, broadcast to every rank by the last segment) to
arrive, i.e. the communication that is *not* hidden. `AsyncDiff.record_timeline()` switches recording on for the
next pipeline call; `AsyncDiff.gather_timeline()` collects every rank's spans on every rank; `draw_timeline`
plots them.

One clock for every rank: ranks start their first span at different times (loading, planning, the first
exchange), so times relative to each rank's own first span made rank 1's warm-up look 3x longer than rank 0's.
Each rank anchors its precise clock (CUDA events, or time.monotonic) to the wall clock once per recording, and
reports spans in wall-clock milliseconds; `draw_timeline` subtracts the earliest start over all ranks. On one host
that is exact to the anchor's microseconds; across hosts it is as good as their clock synchronisation (NTP).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Timeline", "draw_timeline"]


LEGEND = {
    "warm-up": "warm-up: an exact step (the whole denoiser)",
    "compute": "compute: this rank's segment of the denoiser",
    "exchange": "exchange: waiting for other segments' block outputs",
    "ε": "ε: the denoiser output broadcast to every rank",
}
COLORS = {"warm-up": "#bbbbbb", "compute": "#4477aa", "exchange": "#ee6677", "ε": "#ccbb44"}


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self._spans: list[tuple[str, int, str, Any, Any]] = []
        self._anchor: tuple[Any, float] | None = None  # (precise-clock reading, wall-clock ms) taken together

    def clear(self) -> None:
        self._spans = []
        self._anchor = None

    def _take_anchor(self) -> None:
        if self.cuda:
            # an empty queue, so the event runs right when recorded: its time and time.time() coincide
            torch.cuda.synchronize()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._anchor = (event, time.time() * 1e3)
            torch.cuda.synchronize()
        else:
            self._anchor = (time.monotonic(), time.time() * 1e3)

    @contextmanager
    def span(self, kind: str, step: int, lane: str = "compute"):
        if not self.enabled:
            yield
            return
        if self._anchor is None:
            self._take_anchor()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.monotonic()
            yield
            end = time.monotonic()
        self._spans.append((kind, step, lane, start, end))

    def intervals(self) -> list[dict[str, Any]]:
        """Spans as {kind, step, lane, start_ms, end_ms} in wall-clock milliseconds (since the Unix epoch): one
        clock for every process, so the ranks' lists line up when gathered."""
        if not self._spans:
            return []
        base, wall = self._anchor
        if self.cuda:
            torch.cuda.synchronize()
            times = [(wall + base.elapsed_time(s), wall + base.elapsed_time(e)) for _, _, _, s, e in self._spans]
        else:
            times = [(wall + (s - base) * 1e3, wall + (e - base) * 1e3) for _, _, _, s, e in self._spans]
        return [
            {"kind": kind, "step": step, "lane": lane, "start_ms": t0, "end_ms": t1}
            for (kind, step, lane, _, _), (t0, t1) in zip(self._spans, times)
        ]


def align(per_rank: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The spans with the earliest start over all ranks as 0 (the ranks keep their offsets to each other)."""
    starts = [s["start_ms"] for spans in per_rank for s in spans]
    origin = min(starts) if starts else 0.0
    return [
        [{**s, "start_ms": s["start_ms"] - origin, "end_ms": s["end_ms"] - origin} for s in spans] for spans in per_rank
    ]


def _forwards_note(per_rank: list[list[dict[str, Any]]], steps: int | None) -> str | None:
    forwards = len({s["step"] for spans in per_rank for s in spans})
    if steps is not None and forwards == steps + 1:
        return (
            f"{forwards} denoiser forwards for {steps} steps: the scheduler (PNDM, SD's default) makes one extra "
            "call, its PLMS start-up step"
        )
    return None


def draw_timeline(
    per_rank: list[list[dict[str, Any]]], path: str, title: str = "asyncdiff_rt timeline", steps: int | None = None
) -> None:
    """One row per rank and lane on one clock; bars coloured by kind, labelled with the denoiser forward's index.
    ``steps`` (num_inference_steps) lets the figure say why a scheduler shows steps + 1 forwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_rank = align(per_rank)
    rows = [(rank, lane) for rank, spans in enumerate(per_rank) for lane in sorted({s["lane"] for s in spans})]
    end = max((s["end_ms"] for spans in per_rank for s in spans), default=1.0)
    note = _forwards_note(per_rank, steps)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.6 + (0.3 if note else 0)))
    for y, (rank, lane) in enumerate(rows):
        for s in per_rank[rank]:
            if s["lane"] != lane:
                continue
            width = max(s["end_ms"] - s["start_ms"], 1e-3)
            ax.barh(y, width, left=s["start_ms"], color=COLORS.get(s["kind"], "#999999"), edgecolor="white")
            if width > 0.04 * end:
                ax.text(s["start_ms"] + width / 2, y, str(s["step"]), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"rank {r} {lane}" for r, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first span of any rank (one clock for all ranks); bar labels: denoiser forward")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, [LEGEND[k] for k in COLORS], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
