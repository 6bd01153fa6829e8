"""benchmarks/flux_plans.py --cost measured, the path the GPU runs on the real FLUX.1-dev, on a CPU with the tiny
FLUX: every block timed once, three plans per n from the same costs, and a table whose columns agree with each
other and with the model (split quality within 1..n, weights per rank summing to the blocks' bytes, our plan never
worse than equal block counts, the memory-balanced one never heavier)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from asyncdiff_rt.tiny import make_pipeline

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _script():
    spec = importlib.util.spec_from_file_location("flux_plans", ROOT / "benchmarks" / "flux_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_counts():
    split = _script().equal_counts(list("abcdefg"), 3)
    assert split == [list("abc"), list("de"), list("fg")]


def test_measured_table_on_tiny_flux(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_RT_CACHE", str(tmp_path / "cache"))  # timed here, not read from a cache
    fp = _script()
    argv = ["--model", "tiny:flux", "--cost", "measured", "--device", "cpu", "--size", "64", "--max_n", "4"]
    assert fp.main([*argv, "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "plan_tiny_flux_cpu.json").read_text())
    meta, info, rows = data["meta"], data["info"], data["rows"]
    assert meta["cost_model"] == info["cost_model"] == "measured" and not info["costs_from_cache"]
    assert (meta["size"], info["batch"]) == (64, 1)

    transformer = make_pipeline("flux").transformer
    total = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    order = info["order"]
    assert order == [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(4)]
    assert info["model_gib"] == pytest.approx(total / GIB)
    assert info["blocks_gib"] + info["replicated_gib"] == pytest.approx(info["model_gib"])
    assert sum(info["block_gib"].values()) == pytest.approx(info["blocks_gib"])
    assert info["replicated_gib"] > 0  # the embeddings and projections every rank holds
    assert all(ms > 0 for ms in info["block_ms"].values())

    assert [r["n"] for r in rows] == [2, 3, 4]
    for r in rows:
        n = r["n"]
        for kind in ("time", "memory", "equal_counts"):
            v = r[kind]
            assert sum(v["segments"], []) == order and len(v["segments"]) == n
            assert v["blocks_per_segment"] == [len(s) for s in v["segments"]]
            assert sum(v["weights_gib"]) == pytest.approx(info["blocks_gib"])
            assert v["weights_gib"] == pytest.approx([sum(info["block_gib"][b] for b in s) for s in v["segments"]])
            assert v["segment_ms"] == pytest.approx([sum(info["block_ms"][b] for b in s) for s in v["segments"]])
            assert 1.0 <= v["split_quality"] <= n + 1e-9
            assert v["split_quality"] == pytest.approx(sum(v["segment_ms"]) / max(v["segment_ms"]))
            assert v["s_over_n"] == pytest.approx(v["split_quality"] / n)
        # our plan minimises the slowest segment; the memory-balanced one the heaviest rank
        assert r["time"]["split_quality"] >= r["equal_counts"]["split_quality"] - 1e-9
        assert r["time"]["split_quality"] >= r["memory"]["split_quality"] - 1e-9
        assert r["memory"]["max_weights_gib"] <= r["equal_counts"]["max_weights_gib"] + 1e-12
        assert r["memory"]["max_weights_gib"] <= r["time"]["max_weights_gib"] + 1e-12

    md = (tmp_path / "plan_tiny_flux_cpu.md").read_text()
    assert md.startswith("# tiny:flux plans at 64 px, float32, batch 1")
    assert "2 double-stream blocks" in md and "4 single-stream" in md and "eager, minimum" in md
    table = [line for line in md.splitlines() if line.startswith("| 2 |")]
    assert len(table) == 4  # the summary row and one per plan
    cells = table[0].split(" | ")
    assert float(cells[1]) == pytest.approx(rows[0]["time"]["split_quality"], abs=1e-3)
    assert float(cells[7]) == pytest.approx(rows[0]["equal_counts"]["split_quality"], abs=1e-3)
