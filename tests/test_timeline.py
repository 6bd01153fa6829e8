"""The timeline puts every rank on one clock: spans recorded in different processes, at different times, line up
when gathered and drawn (CPU: time.monotonic anchored to the wall clock)."""

from __future__ import annotations

import time

import pytest
import torch

from asyncdiff_rt.runtime.timeline import LEGEND, Timeline, align, draw_timeline
from asyncdiff_rt.tools.launch import spawn


def _record(delay_s: float, kind: str = "compute", step: int = 0) -> list[dict]:
    tl = Timeline(torch.device("cpu"))
    tl.enabled = True
    time.sleep(delay_s)
    with tl.span(kind, step):
        time.sleep(0.02)
    return tl.intervals()


def _rank_worker(rank: int, world: int) -> tuple[float, list[dict]]:
    # rank 1 starts 0.4 s after rank 0 (as a rank that loads or plans longer does)
    before = time.time() * 1e3
    return before, _record(0.4 * rank)


def test_spans_are_wall_clock_milliseconds():
    before = time.time() * 1e3
    spans = _record(0.0)
    after = time.time() * 1e3
    (s,) = spans
    assert before - 1 <= s["start_ms"] <= s["end_ms"] <= after + 1
    assert s["end_ms"] - s["start_ms"] >= 19  # the monotonic clock keeps the duration


def test_ranks_in_different_processes_share_one_clock():
    (before0, spans0), (before1, spans1) = spawn(_rank_worker, 2, timeout_s=300)
    start0, start1 = spans0[0]["start_ms"], spans1[0]["start_ms"]
    # each span starts after its process read the wall clock, and rank 1 about 0.4 s after its own reading
    assert start0 >= before0 - 1 and start1 >= before1 + 390
    # the processes started within a few seconds of each other: far apart clocks would show here
    assert abs(start1 - start0) < 30_000
    per_rank = align([spans0, spans1])
    assert min(s["start_ms"] for spans in per_rank for s in spans) == 0.0
    assert per_rank[1][0]["start_ms"] - per_rank[0][0]["start_ms"] == pytest.approx(start1 - start0)


def test_align_keeps_offsets_and_durations():
    per_rank = [
        [{"kind": "warm-up", "step": 0, "lane": "compute", "start_ms": 1000.0, "end_ms": 1010.0}],
        [{"kind": "warm-up", "step": 0, "lane": "compute", "start_ms": 1004.0, "end_ms": 1010.0}],
    ]
    out = align(per_rank)
    assert out[0][0]["start_ms"] == 0.0 and out[1][0]["start_ms"] == 4.0
    assert out[1][0]["end_ms"] - out[1][0]["start_ms"] == 6.0
    assert per_rank[0][0]["start_ms"] == 1000.0  # the input is left as it was


def test_clear_takes_a_new_anchor():
    tl = Timeline(torch.device("cpu"))
    tl.enabled = True
    with tl.span("compute", 0):
        pass
    first = tl._anchor
    tl.clear()
    assert tl._anchor is None and tl.intervals() == []
    with tl.span("compute", 0):
        pass
    assert tl._anchor is not first


def test_legend_explains_eps():
    assert LEGEND["ε"] == "ε: the denoiser output broadcast to every rank"


def test_draw_timeline_png(tmp_path):
    pytest.importorskip("matplotlib")
    spans = [_record(0.0, "warm-up", k) for k in range(3)]  # 3 forwards for 2 steps: PNDM's extra call
    per_rank = [spans[0] + spans[1] + spans[2], _record(0.01, "ε", 2)]
    path = tmp_path / "timeline.png"
    draw_timeline(per_rank, str(path), "test", steps=2)
    assert path.stat().st_size > 1000
