"""PatchParallel's graph path (strategies/patches/graphs.py) on the CPU, where nothing is captured: the steady
forwards go through the executor (here eager, recording what it is asked for) and equal the eager path exactly;
the graphs are keyed by the slots each step writes and reads (two for the stale modes, one for no_sync), never by
the step, and the arguments' signature is one for the whole loop (the timestep is a tensor, not a number). The
real capture and replay are tests/cuda/test_patch_cuda.py's."""

import pytest
import torch
from patch_cases import deferred_wait_order, graph_path_keys, kv_write_order

from asyncdiff_rt.tools.launch import spawn

MODES = ["corrected_async_gn", "no_sync"]


def test_graph_path_keys_and_equality_on_cpu():
    per_rank = spawn(graph_path_keys, 2, MODES, timeout_s=600)
    for rank, results in enumerate(per_rank):
        for mode, (eager, graph_path, keys, signatures) in zip(MODES, results):
            assert torch.equal(eager, graph_path), f"rank {rank} {mode}"
            assert signatures == 1, f"rank {rank} {mode}: {signatures} argument signatures"
            # 4 PNDM steps call the denoiser 5 times; warm_up=2: steps 2, 3, 4 are steady
            if mode == "no_sync":
                assert keys == [("patch", mode, None, 1)] * 3, keys
            else:
                assert keys == [("patch", mode, 0, 1), ("patch", mode, 1, 0), ("patch", mode, 0, 1)], keys


def test_forwards_with_exchanges_inside_wait_for_the_deferred_k_v_first():
    """With the overlap paths on, every forward that exchanges at its points (exact steps once the points are
    registered, sync_gn's steady steps) is preceded by the wait for the deferred K/V of the step before, and no
    other forward is: a replayed graph's channel ops are not ordered behind the eager K/V transfer (Note [deferred
    K/V] in exchange.py; the cuda tier's sync_gn graphs differed from eager without it)."""
    modes = ["sync_gn", "stale_gn"]
    per_rank = spawn(deferred_wait_order, 2, modes, timeout_s=600)
    for rank, results in enumerate(per_rank):
        for mode, events in zip(modes, results):
            forwards = [e for e in events if e[0] == "forward"]
            # 4 PNDM steps call the denoiser 5 times: step 0 registers (eager, not through the graphs), 1 exact
            assert [f[1] for f in forwards] == [1, 2, 3, 4], (rank, mode, events)
            for i, event in enumerate(events):
                if event[0] == "forward":
                    waited = i > 0 and events[i - 1] == ("await", event[1], -1)  # all groups
                    assert waited == event[2], (rank, mode, event, events)
            assert [f[2] for f in forwards] == ([True] * 4 if mode == "sync_gn" else [True, False, False, False])


@pytest.mark.parametrize("groups", [1, 8])
def test_a_stale_step_writes_its_own_k_v_only_after_the_wait_for_the_k_v_in_flight(groups):
    """K/V have one buffer per point, not one per slot (Note [kv slots] in exchange.py): the K/V sent after step k
    are read from the part step k+1 overwrites, so every steady step's K/V projection into the buffer comes after
    that step's wait for the deferred transfer group of its point (on CUDA an event wait: the send has left), each
    group awaited once, in order, just before its first point (Note [K/V groups]: not all at the first one; one
    group by default, awaited at the first point); both slots' K/V are views of the one buffer."""
    per_rank = spawn(kv_write_order, 2, "corrected_async_gn", groups, timeout_s=600)
    for rank, (events, shared, made) in enumerate(per_rank):
        assert shared and all(shared), (rank, shared)
        assert made == 1 if groups == 1 else made >= 2, f"the tiny UNet's K/V points fall into {made} group(s)"
        # 4 PNDM steps call the denoiser 5 times, warm_up=2: steps 2, 3, 4 are steady
        for step in (2, 3, 4):
            mine = [e for e in events if e[1] == step]
            awaited = [e[2] for e in mine if e[0] == "await"]
            assert awaited == list(range(made)), (rank, step, mine)
            for i, event in enumerate(mine):
                if event[0] == "kv write":
                    before = [e[2] for e in mine[:i] if e[0] == "await"]
                    assert before and before[-1] == event[2], (rank, step, i, mine)
