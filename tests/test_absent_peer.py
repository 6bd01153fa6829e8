"""Issue 14: a rank that builds AsyncDiff but never calls the pipeline. Rank 0's call must raise TransportError
naming peer rank 1 and the phase (a set-up agreement), not a made-up "step -1", within the timeout (plus the
process starts), over gloo and over shm."""

from __future__ import annotations

import time

import pytest
from shm_cases import run_absent_peer

from asyncdiff_rt.tools.launch import spawn

TIMEOUT_S = 5.0


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_rank_that_never_calls_is_named(transport):
    t0 = time.monotonic()
    results = spawn(run_absent_peer, 2, transport, TIMEOUT_S, timeout_s=120)
    elapsed = time.monotonic() - t0
    error, waited = results[0]["error"], results[0]["elapsed"]
    assert error is not None, "rank 0's call returned although rank 1 never called the pipeline"
    kind, msg = error
    assert kind == "TransportError", error
    assert "peer rank 1" in msg and "has not reached it" in msg, msg
    assert "set-up" in msg and "agreement" in msg and "step -1" not in msg, msg
    assert waited < TIMEOUT_S + 3, waited  # gloo notices the closed connection at once, shm waits the timeout
    assert elapsed < TIMEOUT_S + 45, elapsed  # two fresh processes import torch and diffusers first
    assert results[1]["error"] is None
