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
