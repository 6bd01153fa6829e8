"""CFG parallelism (asyncdiff_rt/strategies/cfg.py): the guidance halves on two halves of the ranks.

On CPU over gloo and shm, float64 tiny pipelines (tests/cfg_cases.py): model_n=1 + cfg_parallel (2 processes)
equals plain diffusers computed per guidance half, on every pipeline class; segments + cfg_parallel equal the
segments simulator (which `cfg_parallel` does not change), with the segment dimension over gloo (4 processes) or
`local` (2 processes, also stride 2); two calls in a row are identical; bad input and a dead partner fail clearly
on every rank.
"""

from __future__ import annotations

import time

import pytest
import torch
from cfg_cases import halves_reference, plain, run_cases, simulated
from spawn_cases import WorldResults, ok

from asyncdiff_rt.tools.launch import WorkerError, spawn

TIGHT = 1e-7  # float64: the halves computed apart round at ~1e-10
FAR = 1e-3  # a wrong split (halves swapped, one half computed twice) moves the latents far more

SDXL_N2 = [
    ["conv_in", "down_blocks.0", "down_blocks.1"],
    ["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]
KINDS = ["sd15", "sd21", "sdxl", "sd3", "sd35_medium", "sdxl_inpaint", "sd_upscale", "sdxl_controlnet", "svd",
         "animatediff"]  # fmt: skip

TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 4.0}  # FLUX: two transformer calls per step

CASES_2 = {
    **{f"{k}_cfg2": dict(kind=k) for k in KINDS},
    "sd15_cfg2_two_calls": dict(kind="sd15", calls=2),
    "sd15_cfg2_shm": dict(kind="sd15", transport="shm"),
    "sdxl_cfg2_local_n2": dict(kind="sdxl", model_n=2, plan=SDXL_N2, transport="local", steps=5),
    "sdxl_cfg2_local_n2_stride2": dict(kind="sdxl", model_n=2, plan=SDXL_N2, stride=2, transport="local", steps=6),
    "flux_true_cfg2": dict(kind="flux", call=TRUE_CFG, calls=2),
    "flux_true_cfg2_shm": dict(kind="flux", call=TRUE_CFG, transport="shm"),
    "bad_true_cfg_segments": dict(kind="flux", call=TRUE_CFG, model_n=2, transport="local"),
    "bad_no_guidance": dict(kind="sd15", call={"guidance_scale": 1.0}),
    "bad_disagree": dict(kind="sd15", rank_cfg=[True, False]),
}
CASES_4 = {
    "sdxl_cfg2_n2": dict(kind="sdxl", model_n=2, plan=SDXL_N2, steps=5),
}

results = WorldResults(run_cases)  # every case of a world size in one spawn


@pytest.mark.parametrize("kind", KINDS)
def test_cfg2_equals_plain_diffusers_per_half(kind):
    case = CASES_2[f"{kind}_cfg2"]
    outs = ok(results(2, CASES_2)[f"{kind}_cfg2"])
    ref = halves_reference(case)
    for rank, got in enumerate(outs):  # only rank 0 decodes; with latents out every rank has the same
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")
    torch.testing.assert_close(outs[0][0], plain(case), rtol=1e-6, atol=1e-6)  # and plain diffusers, to rounding


def test_two_calls_in_a_row_identical():
    outs = ok(results(2, CASES_2)["sd15_cfg2_two_calls"])
    assert torch.equal(outs[0][0], outs[0][1])


def test_cfg2_over_shm():
    case = CASES_2["sd15_cfg2_shm"]
    outs = ok(results(2, CASES_2)["sd15_cfg2_shm"])
    torch.testing.assert_close(outs[0][0], halves_reference(case), rtol=0, atol=TIGHT)


@pytest.mark.parametrize("name", ["sdxl_cfg2_local_n2", "sdxl_cfg2_local_n2_stride2"])
def test_cfg_with_local_segments_equals_the_simulator(name):
    case = CASES_2[name]
    outs = ok(results(2, CASES_2)[name])
    ref = simulated(case)
    assert (ref - plain(case)).abs().max() > FAR  # asynchronous: far from the exact run
    for got in outs:
        torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-6)


def test_cfg_with_segments_on_four_processes_equals_the_simulator():
    case = CASES_4["sdxl_cfg2_n2"]
    outs = ok(results(4, CASES_4)["sdxl_cfg2_n2"])
    ref = simulated(case)
    assert (ref - plain(case)).abs().max() > FAR
    for got in outs:
        torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["flux_true_cfg2", "flux_true_cfg2_shm"])
def test_flux_true_cfg_split_over_two_processes_equals_plain_diffusers(name):
    # each half computes one of the step's two transformer calls at its own batch: the same kernels as plain
    case = CASES_2[name]
    outs = ok(results(2, CASES_2)[name])
    exact = plain(case)
    assert (exact - plain({**case, "call": {}})).abs().max() > FAR  # true CFG changes the result
    for rank, got in enumerate(outs):
        for call, latents_ in enumerate(got):
            torch.testing.assert_close(latents_, exact, rtol=0, atol=TIGHT, msg=f"rank {rank} call {call}")


def test_flux_true_cfg_with_segments_is_refused_naming_model_n():
    for rank, got in enumerate(results(2, CASES_2)["bad_true_cfg_segments"]):
        assert got[0] == "error" and got[1] == "ConfigError", f"rank {rank}: {got}"
        assert "true CFG" in got[2] and "model_n=1" in got[2], got[2]


def test_call_without_guidance_is_refused_naming_cfg_parallel():
    for rank, got in enumerate(results(2, CASES_2)["bad_no_guidance"]):
        assert got[0] == "error" and got[1] == "ConfigError", f"rank {rank}: {got}"
        assert "cfg_parallel" in got[2] and "guidance_scale=1.0" in got[2]


def test_ranks_that_disagree_on_cfg_parallel_fail_on_every_rank():
    for rank, got in enumerate(results(2, CASES_2)["bad_disagree"]):
        assert got[0] == "error" and got[1] == "ConfigError", f"rank {rank}: {got}"
        assert "disagree" in got[2] and "cfg_parallel" in got[2], got[2]


def test_odd_world_is_refused():
    per_rank = spawn(run_cases, 3, [dict(kind="sd15")], timeout_s=300)
    for rank, got in enumerate(per_rank):
        assert got[0][0] == "error" and got[0][1] == "ConfigError", f"rank {rank}: {got}"
        assert "needs 2 processes" in got[0][2] and "cfg_parallel=True" in got[0][2], got[0][2]


def test_dead_partner_makes_the_other_raise_within_the_timeout():
    case = dict(kind="sd15", steps=6, timeout_s=5, kill_rank=1)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(run_cases, 2, [case], timeout_s=120)
    elapsed = time.monotonic() - start
    assert "exit code 3" in info.value.errors[1]
    got = info.value.results[0][0]
    assert got[0] == "error" and got[1] == "TransportError", got
    assert "rank 1" in got[2], got[2]
    assert elapsed < 5 + 40, elapsed  # the timeout, plus process start and the tiny pipelines' set-up
