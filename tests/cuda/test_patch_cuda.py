"""PatchParallel's CUDA graphs on one GPU (strategies/patches/graphs.py, Note [patch graphs]): 2 processes over
shm, fp32 without TF32, tiny SD 1.5 (128 px) and SDXL (64 px); graphs=True equals graphs=False equals the patch
simulator, and graphs were captured (two per stale mode: one per step parity; one for no_sync). 6 steps with
warm_up=2: steps 2 and 3 capture, 4 and 5 replay; the second call replays every steady step. sync_gn and
full_sync (exchanges inside the forward, captured with the shm ops inside) are checked apart."""

import pytest
import torch
from patch_cases import run_cases, simulated

from asyncdiff_rt.tools.launch import spawn

pytestmark = pytest.mark.cuda

SIZES = {"sd15": 128, "sdxl": 64}
MODES = ("corrected_async_gn", "stale_gn", "no_sync")
INLINE = ("sync_gn", "full_sync")
TOL = 1e-4
_RESULTS: dict = {}


def case_of(kind: str, mode: str) -> dict:
    return dict(
        kind=kind, size=SIZES[kind], sync_mode=mode, steps=6, warm_up=2, transport="shm", device="cuda", calls=2
    )


def results(graphs: bool, modes: tuple) -> dict:
    key = (graphs, modes)
    if key not in _RESULTS:
        names = [(k, m) for k in SIZES for m in modes]
        cases = [dict(case_of(k, m), graphs=graphs) for k, m in names]
        per_rank = spawn(run_cases, 2, cases, timeout_s=600)
        _RESULTS[key] = {n: [r[i] for r in per_rank] for i, n in enumerate(names)}
    return _RESULTS[key]


def check(kind: str, mode: str, modes: tuple, graphs_expected: int | None) -> None:
    graphed, eager = results(True, modes)[kind, mode], results(False, modes)[kind, mode]
    ref = simulated(case_of(kind, mode), patches=2).cpu()
    for rank in range(2):
        assert graphed[rank][0] == "ok", f"graphs=True rank {rank}: {graphed[rank]}"
        assert eager[rank][0] == "ok", f"graphs=False rank {rank}: {eager[rank]}"
        assert eager[rank][3] == 0, "graphs=False captured graphs"
        captures = graphed[rank][3]
        if graphs_expected is None:
            assert captures > 0, f"rank {rank}: no graph was captured"
        else:
            assert captures == graphs_expected, f"rank {rank}: {captures} graphs captured, {graphs_expected} expected"
        for call in range(2):
            got, want = graphed[rank][1][call], eager[rank][1][call]
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=f"rank {rank} call {call}: graphs vs eager")
            torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL, msg=f"rank {rank} call {call}: vs simulator")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(SIZES))
def test_patch_graphs_equal_eager_and_the_simulator(kind, mode):
    check(kind, mode, MODES, 1 if mode == "no_sync" else 2)


@pytest.mark.parametrize("mode", INLINE)
@pytest.mark.parametrize("kind", list(SIZES))
def test_patch_graphs_with_exchanges_inside_the_forward(kind, mode):
    # sync_gn's capture with the shm ops inside failed on the H200 (2026-12-01, "invalid argument"): eager for now
    check(kind, mode, INLINE, 0 if mode == "sync_gn" else None)


# ---- the two modes left eager (GRAPH_VERIFIED_MODES), captured anyway (graphs.UNVERIFIED_ENV) to tell why ------
# corrected_async_gn in fp32 is ill-conditioned: the same simulator run in fp32 and fp64 differs by 1e-2 on tiny
# SDXL (the other modes: 2e-5), so graphs whose kernels round otherwise than eager's fail a 1e-4 comparison
# without any bug. In float64 rounding is gone: a graph bug would still show, a conditioning effect would not.
# sync_gn: before the first capture with shm ops inside, the transport is now sized for the packed exchange
# (graphs.py, Note [patch graphs]); fp32 here, since sync_gn is as well-conditioned as stale_gn.
FORCED = {("corrected_async_gn", "float64"): 1e-8, ("sync_gn", "float64"): 1e-8, ("sync_gn", "float32"): TOL}
_FORCED_RESULTS: dict = {}


def forced_results(monkeypatch, graphs: bool) -> dict:
    if graphs not in _FORCED_RESULTS:
        from asyncdiff_rt.strategies.patches.graphs import UNVERIFIED_ENV

        monkeypatch.setenv(UNVERIFIED_ENV, "1")  # the workers inherit it at spawn
        names = [(k, m, d) for k in SIZES for m, d in FORCED]
        cases = [dict(case_of(k, m), dtype=d, graphs=graphs) for k, m, d in names]
        per_rank = spawn(run_cases, 2, cases, timeout_s=600)
        _FORCED_RESULTS[graphs] = {n: [r[i] for r in per_rank] for i, n in enumerate(names)}
    return _FORCED_RESULTS[graphs]


@pytest.mark.parametrize("mode,dtype", list(FORCED))
@pytest.mark.parametrize("kind", list(SIZES))
def test_unverified_mode_graphs_equal_eager_when_forced(kind, mode, dtype, monkeypatch):
    tol = FORCED[mode, dtype]
    graphed, eager = (
        forced_results(monkeypatch, True)[kind, mode, dtype],
        forced_results(monkeypatch, False)[kind, mode, dtype],
    )
    ref = simulated(dict(case_of(kind, mode), dtype=dtype), patches=2).cpu()
    for rank in range(2):
        assert graphed[rank][0] == "ok" and eager[rank][0] == "ok", (graphed[rank], eager[rank])
        assert graphed[rank][3] > 0, f"rank {rank}: no graph captured (capture failed: see the log)"
        for call in range(2):
            got, want = graphed[rank][1][call], eager[rank][1][call]
            diff = (got - want).abs().max().item()
            print(f"{kind} {mode} {dtype} rank {rank} call {call}: graphs vs eager max |diff| {diff:.3g}")
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"rank {rank} call {call}: graphs vs eager")
            torch.testing.assert_close(want, ref, rtol=tol, atol=tol, msg=f"rank {rank} call {call}: eager vs sim")
