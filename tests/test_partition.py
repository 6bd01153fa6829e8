"""Partitioning (compiler.partition) against brute force, costs and their cache, plan_for on tiny models."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from partition_oracle import brute_force
from test_blocks_trace import TINY, load_plan_table, one_thread  # noqa: F401 (the autouse fixture)

from asyncdiff_rt.compiler.blocks import candidate_blocks
from asyncdiff_rt.compiler.cost import measure_block_costs
from asyncdiff_rt.compiler.partition import partition, range_costs, segment_bytes
from asyncdiff_rt.compiler.plan_table import format_plan_table
from asyncdiff_rt.compiler.planning import plan_for_denoiser
from asyncdiff_rt.compiler.trace import INPUT, OUTPUT, BlockRecord, Edge, LeafInfo, Trace, trace_denoiser


def random_trace(rng: random.Random, n_blocks: int, early_output: bool = False) -> tuple[list[str], Trace]:
    """A chain with random skip edges and random output sizes; blocks with one or two output leaves."""
    order = [f"b{i}" for i in range(n_blocks)]
    blocks = {}
    for b in order:
        n_leaves = rng.choice([1, 1, 2])
        blocks[b] = BlockRecord(
            name=b,
            calls=1,
            outputs=[
                LeafInfo(shape=[k], dtype="float32", nbytes=rng.choice([0, 100, 1000, 5000])) for k in range(n_leaves)
            ],
        )
    edges = []
    for i, src in enumerate(order):
        for j in range(i + 1, n_blocks):
            if j == i + 1 or rng.random() < 0.25:
                leaves = sorted(rng.sample(range(len(blocks[src].outputs)), rng.randint(1, len(blocks[src].outputs))))
                nbytes = sum(blocks[src].outputs[k].nbytes for k in leaves)
                edges.append(Edge(src, order[j], nbytes, [[k] for k in leaves], ["float32"] * len(leaves), leaves))
    edges.append(Edge(INPUT, order[0], 8, [[2]], ["float32"], [0]))
    sources = [order[-1]] + ([order[n_blocks - 2]] if early_output and n_blocks > 2 else [])
    for s in sources:
        edges.append(Edge(s, OUTPUT, blocks[s].outputs[0].nbytes, [[0]], ["float32"], [0]))
    return order, Trace(order=order, blocks=blocks, edges=edges)


def objective(plan, cost, trace, bandwidth):
    """The slowest segment's time for a plan, computed naively (DP's byte model: each leaf once)."""
    worst = 0.0
    for seg in plan.segments:
        s = set(seg.blocks)
        moved = 0
        per_leaf = {}
        for e in trace.block_edges():
            for leaf in e.leaves:
                per_leaf.setdefault((e.src, leaf), set()).add(e.dst)
        for (src, leaf), consumers in per_leaf.items():
            nbytes = trace.blocks[src].outputs[leaf].nbytes
            if src not in s and consumers & s:
                moved += nbytes
            if src in s and not consumers <= s:
                moved += nbytes
        worst = max(worst, sum(cost[b] for b in seg.blocks) + (moved / bandwidth * 1e3 if bandwidth else 0.0))
    return worst


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n_blocks = rng.randint(2, 8)
    order, trace = random_trace(rng, n_blocks, early_output=seed % 3 == 0)
    cost = {b: rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, 7.5]) for b in order}
    for bandwidth in (None, 1e6):
        for keep in (False, True):
            for n in range(1, n_blocks + 1):
                try:
                    plan = partition(order, cost, trace, n, bandwidth_Bps=bandwidth, keep_head_tail=keep)
                except ValueError:
                    assert brute_force(order, cost, trace, n, bandwidth, keep) == np.inf
                    continue
                plan.validate(torch.nn.ModuleDict({b: torch.nn.Linear(1, 1) for b in order}))
                expect = brute_force(order, cost, trace, n, bandwidth, keep)
                assert plan.meta["objective_ms"] == pytest.approx(expect, rel=1e-9, abs=1e-12)
                assert objective(plan, cost, trace, bandwidth) == pytest.approx(expect, rel=1e-9, abs=1e-12)
                assert sorted(plan.blocks) == sorted(order) and plan.model_n == n
                # the last segment owns the output's source blocks
                assert trace.output_sources() <= set(plan.segments[-1].blocks)
                if not keep:
                    assert plan.blocks == order  # contiguous, in call order
                assert plan.meta["split_quality"] == plan.split_quality() or plan.split_quality() is None
                # among the optimal plans, the fewest bytes across boundaries
                moved = sum(s.bytes_in for s in plan.segments) + plan_moved_out(plan, trace)
                limit = expect * (1 + 1e-9) + 1e-12
                assert moved == brute_force(order, cost, trace, n, bandwidth, keep, limit=limit)


def plan_moved_out(plan, trace):
    """bytes_out as the DP counts it (each leaf once)."""
    owner = plan.owner()
    total = 0
    per_leaf = {}
    for e in trace.block_edges():
        for leaf in e.leaves:
            per_leaf.setdefault((e.src, leaf), set()).add(e.dst)
    for (src, leaf), consumers in per_leaf.items():
        if {owner[c] for c in consumers - {src}} - {owner[src]}:
            total += trace.blocks[src].outputs[leaf].nbytes
    return total


@pytest.mark.parametrize("seed", range(6))
def test_slack_trades_time_for_bytes(seed):
    rng = random.Random(100 + seed)
    order, trace = random_trace(rng, 8)
    cost = {b: rng.choice([0.5, 1.0, 2.0, 3.0]) for b in order}
    for n in (2, 3, 4):
        exact = partition(order, cost, trace, n)
        loose = partition(order, cost, trace, n, slack=0.5)
        opt = exact.meta["objective_ms"]
        assert loose.meta["objective_ms"] <= opt * 1.5 + 1e-9
        moved = sum(s.bytes_in for s in loose.segments) + plan_moved_out(loose, trace)
        assert moved == brute_force(order, cost, trace, n, limit=opt * 1.5 + 1e-12)
        assert moved <= sum(s.bytes_in for s in exact.segments) + plan_moved_out(exact, trace)


def test_range_costs_match_naive():
    rng = random.Random(5)
    order, trace = random_trace(rng, 7)
    cost = {b: float(i + 1) for i, b in enumerate(order)}
    compute, b_in, b_out = range_costs(order, cost, trace)
    for i in range(len(order)):
        for j in range(i + 1, len(order) + 1):
            seg = order[i:j]
            assert compute[i, j] == pytest.approx(sum(cost[b] for b in seg))
            (ins, outs) = segment_bytes([seg, [b for b in order if b not in seg]], trace)[0]
            assert b_in[i, j] == ins
            # DP counts each leaf once, the plan once per consuming segment: equal with only two segments
            assert b_out[i, j] == outs


def test_partition_errors_and_head_tail():
    rng = random.Random(1)
    order, trace = random_trace(rng, 5)
    cost = dict.fromkeys(order, 1.0)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="from 1 to 5"):
            partition(order, cost, trace, bad)
    with pytest.raises(ValueError, match="no cost"):
        partition(order, {}, trace, 2)
    plan = partition(order, cost, trace, 3, keep_head_tail=True)
    last = plan.segments[-1].blocks
    assert "b0" in last and "b4" in last  # head and tail together, last segment owns the output block
    assert plan.meta["head_blocks"] >= 1
    assert "+ b0" in format_plan_table(plan)  # the wrap-around segment prints as tail run + head run


def test_segment_bytes_counts_each_consuming_segment():
    blocks = {b: BlockRecord(b, 1, [LeafInfo([1], "float32", 10)]) for b in "abc"}
    edges = [Edge("a", "b", 10, [[1]], ["float32"], [0]), Edge("a", "c", 10, [[1]], ["float32"], [0])]
    trace = Trace(order=list("abc"), blocks=blocks, edges=edges + [Edge("c", OUTPUT, 10, [[1]], ["float32"], [0])])
    assert segment_bytes([["a"], ["b"], ["c"]], trace) == [(0, 20), (10, 0), (10, 0)]
    assert segment_bytes([["a"], ["b", "c"]], trace) == [(0, 10), (10, 0)]


# ------------------------------------------------------------------------------------------------ costs, plan_for
def test_costs_cached_on_second_call(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_RT_CACHE", str(tmp_path))
    model, (args, kwargs) = TINY["sd"][0](), TINY["sd"][1]()
    blocks = candidate_blocks(model)
    first = measure_block_costs(model, args, kwargs, blocks, repeats=2, warmup=1)
    assert not first.from_cache and set(first) == set(blocks) and all(v > 0 for v in first.values())
    assert first.denoiser_ms is not None and len(list(tmp_path.glob("*.json"))) == 1
    second = measure_block_costs(model, args, kwargs, blocks, repeats=2, warmup=1)
    assert second.from_cache and dict(second) == dict(first)
    # another shape is another key
    args2 = (torch.randn(1, 4, 16, 16), args[1])
    kwargs2 = {"encoder_hidden_states": kwargs["encoder_hidden_states"][:1]}
    third = measure_block_costs(model, args2, kwargs2, blocks, repeats=2, warmup=1)
    assert not third.from_cache and len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize("kind", list(TINY))
def test_plan_for_tiny_models(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_RT_CACHE", str(tmp_path))
    model = TINY[kind][0]()
    n_blocks = len(candidate_blocks(model))
    for n in range(1, min(4, n_blocks) + 1):
        plan = plan_for_denoiser(model, n, 64, 64, repeats=1)
        plan.validate(model)
        assert plan.model_n == n and len(plan.blocks) == n_blocks
        assert plan.meta["traced_on"] == "meta" and plan.meta["batch"] == 2
        assert plan.meta["costs_from_cache"] == (n > 1)
        assert all(s.cost_ms is not None and s.bytes_in is not None for s in plan.segments)
        assert plan.segments[0].bytes_in == 0  # the first segment reads only the replicated inputs
        table = format_plan_table(plan)
        assert "split quality" in table and f"S{n - 1}" in table
    with pytest.raises(ValueError, match=f"from 1 to {n_blocks}"):
        plan_for_denoiser(model, n_blocks + 1, 64, 64, repeats=1)


def test_plan_for_with_pipeline_object(tmp_path, monkeypatch):
    """plan_for finds the denoiser on the pipeline; here a stand-in object with .unet, SDXL-shaped."""
    from asyncdiff_rt.compiler.planning import plan_for

    monkeypatch.setenv("ASYNCDIFF_RT_CACHE", str(tmp_path))

    class Pipe:
        vae_scale_factor = 8

    pipe = Pipe()
    pipe.unet = TINY["sdxl"][0]()
    plan = plan_for(pipe, 3, 64, 64, keep_head_tail=True, repeats=1)
    plan.validate(pipe.unet)
    assert "conv_in" in plan.segments[-1].blocks and "conv_out" in plan.segments[-1].blocks
    assert plan.meta["shape"]["['added_cond_kwargs']['time_ids']"] == [2, 6]


def test_plan_table_benchmark_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_RT_CACHE", str(tmp_path / "cache"))
    pt = load_plan_table()
    argv = ["--model", "sdxl", "--tiny", "--resolution", "64", "--out", str(tmp_path), "--repeats", "1", "--n", "2,4"]
    argv += ["--granularity", "coarse"]
    assert pt.main(argv) == 0
    files = sorted(p.name for p in tmp_path.glob("plan_*"))
    assert files == ["plan_sdxl-tiny_cpu.json", "plan_sdxl-tiny_cpu.md"]


def test_trace_of_plan_matches_needed_by():
    """Every non-owned block a segment reads is one the trace says it needs."""
    model, (args, kwargs) = TINY["sd"][0](), TINY["sd"][1]()
    blocks = candidate_blocks(model)
    trace = trace_denoiser(model, args, kwargs, blocks)
    plan = partition(blocks, dict.fromkeys(blocks, 1.0), trace, 3)
    owner = plan.owner()
    for i, seg in enumerate(plan.segments):
        need = trace.needed_by(set(seg.blocks))
        assert all(owner[b] != i for b in need)
        direct = {e.src for e in trace.block_edges() if e.dst in seg.blocks and owner[e.src] != i}
        assert direct <= need


def test_load_pipeline_for_planning(tmp_path):
    """asyncdiff-rt plan --model: built-in real architectures (meta here: no memory) and local folders."""
    import json

    from asyncdiff_rt.models import default_resolution
    from asyncdiff_rt.models.denoiser import find_denoiser
    from asyncdiff_rt.tools.loading import load_pipeline_for_planning

    for name, cls, size in (("sdxl", "UNet2DConditionModel", 1024), ("sd3", "SD3Transformer2DModel", 1024)):
        pipe = load_pipeline_for_planning(name, device="meta")
        _, den = find_denoiser(pipe)
        assert type(den).__name__ == cls and next(den.parameters()).is_meta
        assert default_resolution(pipe, den) == (size, size)
    unet = TINY["sd"][0]()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    pipe = load_pipeline_for_planning(str(tmp_path), dtype="float32", device="cpu")
    assert pipe.vae_scale_factor == 8
    assert set(candidate_blocks(pipe.unet)) == set(candidate_blocks(unet))


def test_plan_reports_weights_per_segment_and_balances_memory_on_request():
    """FLUX's double-stream blocks hold ~2.4x a single block's weights: balance="memory" evens the weights per
    rank out (at some cost in time balance); every plan reports each segment's weights exactly."""
    from asyncdiff_rt import plan_for
    from asyncdiff_rt.compiler.plan_table import format_plan_table
    from asyncdiff_rt.compiler.planning import block_weight_bytes
    from asyncdiff_rt.tiny import make_pipeline

    pipe = make_pipeline("flux")
    den = pipe.transformer
    by_time = plan_for(pipe, 2, cost="flops", max_sequence_length=32)
    by_memory = plan_for(pipe, 2, cost="flops", balance="memory", max_sequence_length=32)
    weights = block_weight_bytes(den, by_time.blocks)
    for plan in (by_time, by_memory):
        assert [s.weight_bytes for s in plan.segments] == [sum(weights[b] for b in s.blocks) for s in plan.segments]
        assert all(s.cost_ms is not None and s.cost_ms > 0 for s in plan.segments)  # compute, also when by memory
    heaviest = max(s.weight_bytes for s in by_memory.segments)
    assert heaviest <= max(s.weight_bytes for s in by_time.segments)
    assert heaviest <= 0.5 * sum(weights.values()) + max(weights.values())  # as even as whole blocks allow
    assert by_memory.meta["balance"] == "memory" and "weights" in format_plan_table(by_memory)
    with pytest.raises(ValueError, match="balance must be one of time, memory"):
        plan_for(pipe, 2, cost="flops", balance="speed", max_sequence_length=32)
