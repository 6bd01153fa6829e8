"""Every pipeline class of DESIGN §7 under the runtime over gloo (2 ranks: n=2 stride 1; 3 ranks: n=2 stride 2)
equals `asyncdiff_rt.simulators.segments` with the same explicit plan, and `warm_up >= steps` equals plain diffusers.

One spawn per world size runs every case of that size (tests/pipeline_cases.py); the parent computes the
references (simulate, plain diffusers) from the same tiny pipelines (same seed: identical weights) and compares.
Each asynchronous case also checks that the asynchronous result is far from the exact one (O(0.1-1)), so a runtime
that silently ran exactly (or replayed the wrong step) could not pass.
"""

from __future__ import annotations

import pytest
import torch
from pipeline_cases import (
    build,
    case_id,
    cfg_off,
    exact,
    run_cases,
    simulated,
    swap_scheduler,
    variant,
    variant_id,
)

import asyncdiff_rt
from asyncdiff_rt.tiny import KINDS
from asyncdiff_rt.tools.launch import spawn

# the 9 classes (sd15 and sd21 share StableDiffusionPipeline; FLUX.1-dev and -schnell share FluxPipeline; SD3.5
# medium and large ride on StableDiffusion3Pipeline)
PIPELINE_KINDS = [k for k in KINDS if k != "demo"]
ATOL = 1e-5  # fp32, same weights and kernels (one thread each side): equal in practice
FAR = 5e-2  # an asynchronous result differs from the exact one by more than this (measured: 0.14 .. 6)

BATCH2 = {"prompt": ["a photo of a cat", "a red car in the city"], "negative_prompt": ["dark", "old"]}
DENOISER_CALLS_2 = "calls the denoiser 2 times per step"
# warm_up >= the loop's denoiser calls runs exactly (sd15's PNDM calls the denoiser steps + 1 times)
EXACT = {"steps": 3, "warm_up": 5, "expect": "exact"}

# Call variants per kind, on one attached AsyncDiff: batches of prompts, images per prompt, CFG off and on,
# callbacks, and an exact call (warm_up >= steps through ad.reset_state).
VARIANTS_1 = {
    "sd15": [
        {"call": {**BATCH2, "num_images_per_prompt": 2}},
        {"call": {**BATCH2, **cfg_off("sd15")}},
        {"callback": "edit"},
    ],
    "sdxl": [{"call": {"num_images_per_prompt": 2, **cfg_off("sdxl")}}],
    "sd3": [
        {"call": {**BATCH2, "num_images_per_prompt": 2}},
        {"call": cfg_off("sd3")},
        {"callback": "edit"},
        {},  # state resets between calls
    ],
    "sdxl_inpaint": [{"steps": 6, "callback": "record"}],  # strength 0.75: the loop starts at begin_index
    "sd_upscale": [{"call": {**BATCH2, "image": None}}, {"callback": "old"}],  # batch of low-res images: below
    "svd": [{"call": {"num_videos_per_prompt": 2, **cfg_off("svd")}}],
    "animatediff": [{"call": {**BATCH2, **cfg_off("animatediff")}}],
}
VARIANTS_2 = {
    "sd15": [{"call": {**BATCH2, "num_images_per_prompt": 2, **cfg_off("sd15")}}, {"steps": 5, "callback": "edit"}],
    "sdxl": [{"steps": 5, "call": {"num_images_per_prompt": 2}}],
    "sd3": [{"call": {**BATCH2, **cfg_off("sd3")}}],
    "sdxl_controlnet": [{"callback": "record"}],
    "flux": [{"steps": 5, "callback": "record"}],
    "sd21": [{"steps": 3, "warm_up": 3, "expect": "exact"}],  # warm_up == steps (DDIM: one call per step)
}

# ---- 2 ranks: model_n=2, stride 1 ------------------------------------------------------------------------------
CASES_2 = [dict(kind=k, calls=[{}, EXACT] + VARIANTS_1.get(k, [])) for k in PIPELINE_KINDS] + [
    dict(kind="sd15", plan="fine", warm_up=2, calls=[{"steps": 5, "warm_up": 2}], time_shift=True),
    dict(kind="sdxl", plan="inside_up"),
    dict(kind="sdxl", plan="head_tail"),
    dict(kind="sdxl", plan="inside_attn", drop_weights=False),  # every rank keeps all weights
    dict(kind="sdxl_controlnet", plan="head_tail", controlnet="replicated"),
    dict(kind="sdxl_controlnet", plan="replicated", controlnet="replicated", calls=[{"call": {"guess_mode": True}}]),
    dict(kind="sdxl_controlnet", calls=[{"call": {"guess_mode": True}}, {"call": cfg_off("sdxl_controlnet")}]),
    dict(kind="sd3", plan="uneven"),
    dict(kind="flux", time_shift=True, calls=[{"steps": 5}]),
    # schedulers that call the denoiser twice per step: refused at construction and at call, on every rank
    dict(kind="sd15", scheduler_before="KDPM2DiscreteScheduler", expect_error=DENOISER_CALLS_2),
    dict(kind="sdxl", swap_scheduler="HeunDiscreteScheduler", expect_error=DENOISER_CALLS_2),
]

# ---- 3 ranks: model_n=2, stride 2 ------------------------------------------------------------------------------
CASES_3 = [
    dict(kind=k, stride=2, calls=[{"steps": 5 if k in ("sd15", "sdxl", "sd3") else 4}] + VARIANTS_2.get(k, []))
    for k in PIPELINE_KINDS
] + [
    dict(kind="sd15", plan="fine", stride=2, time_shift=True, calls=[{"steps": 6, "warm_up": 2}]),
    dict(kind="sdxl", plan="inside_up", stride=2),
    dict(kind="sdxl", plan="head_tail", stride=2),
    dict(kind="sd3", stride=2, stride_eps="fresh", calls=[{"steps": 5}]),
    dict(kind="flux", stride=2, time_shift=True, calls=[{"steps": 6, "warm_up": 2}]),
    dict(kind="svd", stride=2, drop_weights=False),
    dict(kind="sdxl_controlnet", plan="replicated", controlnet="replicated", stride=2),
]


def _fill(cases):
    """Inputs a case cannot spell as constants (the upscaler's batch of low-res images)."""
    from asyncdiff_rt.tiny._common import pil_image

    for case in cases:
        for v in case.get("calls", []):
            if v.get("call", {}).get("image", 0) is None:
                v["call"] = {**v["call"], "image": [pil_image(0, 16, 16), pil_image(1, 16, 16)]}
    return cases


_fill(CASES_2)
_fill(CASES_3)


def _ids(cases):
    return [(c, i) for c in range(len(cases)) for i in range(len(cases[c].get("calls", [{}])))]


_RESULTS: dict[int, list] = {}


def results_for(world: int) -> list:
    """Run every case of this world size in one spawn (once per session)."""
    if world not in _RESULTS:
        cases = CASES_2 if world == 2 else CASES_3
        _RESULTS[world] = spawn(run_cases, world, cases, timeout_s=600)
    return _RESULTS[world]


def _check_case(world: int, index: int, call: int) -> None:
    case = (CASES_2 if world == 2 else CASES_3)[index]
    per_rank = [results[index] for results in results_for(world)]
    if "expect_error" in case:
        for rank, got in enumerate(per_rank):
            assert got[0] == "error", f"rank {rank} did not refuse: {got}"
            assert got[1] == "DenoiserError" and case["expect_error"] in got[2], got
        return
    for rank, got in enumerate(per_rank):
        assert got[0] == "ok", f"rank {rank}: {got}"
    v = variant(case, call)
    out = per_rank[0][1][call][0]
    ref_exact, exact_records, loop = exact(v)
    if v.get("expect") == "exact":
        assert v["warm_up"] >= loop
        ref, ref_records = ref_exact, exact_records
    else:
        assert v.get("warm_up", 1) < loop
        ref, ref_records = simulated(v)
        # the comparison can tell a wrong runtime: asynchronous differs from exact by O(0.1-1)
        assert (ref - ref_exact).abs().max() > FAR, "asynchronous run indistinguishable from the exact one"
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=ATOL)
    if v.get("callback"):
        # every rank runs the callback at every step, with the step index and timestep of plain diffusers
        expected_steps = [i for i, _ in exact_records]
        assert expected_steps == list(range(loop)) and loop >= 3
        for rank, got in enumerate(per_rank):
            records = got[1][call][1]
            assert [i for i, _ in records] == expected_steps, f"rank {rank}: {records}"
            assert [t for _, t in records] == pytest.approx([t for _, t in exact_records]), f"rank {rank}"
        assert ref_records == exact_records  # the simulator's callback sees plain diffusers' steps too


@pytest.mark.parametrize(
    "index,call",
    _ids(CASES_2),
    ids=[f"{case_id(CASES_2[c])}/{variant_id(CASES_2[c].get('calls', [{}])[i])}" for c, i in _ids(CASES_2)],
)
def test_two_ranks_stride1(index, call):
    _check_case(2, index, call)


@pytest.mark.parametrize(
    "index,call",
    _ids(CASES_3),
    ids=[f"{case_id(CASES_3[c])}/{variant_id(CASES_3[c].get('calls', [{}])[i])}" for c, i in _ids(CASES_3)],
)
def test_three_ranks_stride2(index, call):
    _check_case(3, index, call)


def test_case_coverage():
    """Each pipeline kind runs asynchronously at both strides, and exactly (warm_up >= steps)."""
    for kind in PIPELINE_KINDS:
        for cases in (CASES_2, CASES_3):
            calls = [variant(c, i) for c in cases if c["kind"] == kind for i in range(len(c.get("calls", [{}])))]
            assert any(v.get("expect") != "exact" and "expect_error" not in v for v in calls), kind
        exact_calls = [variant(CASES_2[c], i) for c, i in _ids(CASES_2) if CASES_2[c]["kind"] == kind]
        assert any(v.get("expect") == "exact" for v in exact_calls), kind


# ---- refusals in one process: before any work ------------------------------------------------------------------


class _Counter:
    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
@pytest.mark.parametrize("transport", ["local", "gloo"])
def test_multi_call_scheduler_refused_at_construction(scheduler, transport):
    """Refused before any communication: with transport="gloo" and no process group the scheduler error comes
    first (not the one about torchrun), and nothing is left attached."""
    pipe = build("sd15")
    swap_scheduler(pipe, scheduler)
    cls = type(pipe)
    with pytest.raises(asyncdiff_rt.DenoiserError, match=DENOISER_CALLS_2) as err:
        asyncdiff_rt.AsyncDiff(pipe, model_n=2, plan=[["conv_in", "down_blocks"], ["mid_block", "up_blocks",
                               "conv_out"]], transport=transport)  # fmt: skip
    assert scheduler in str(err.value) and "DDIMScheduler" in str(err.value)  # names it and what to use instead
    assert type(pipe) is cls and "forward" not in pipe.unet.__dict__


@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_multi_call_scheduler_swapped_after_attaching(scheduler):
    """Swapped in after AsyncDiff was attached: the call raises before the text encoder or the denoiser runs."""
    pipe = build("sdxl")
    case = dict(kind="sdxl", steps=3)
    from pipeline_cases import one_thread, plan_of, run_call

    ref = simulated(case)[0]
    ad = asyncdiff_rt.AsyncDiff(pipe, model_n=2, plan=plan_of(case), transport="local")
    counter = _Counter(pipe.text_encoder, pipe.unet.conv_in, pipe.vae)
    try:
        swap_scheduler(pipe, scheduler)
        with pytest.raises(asyncdiff_rt.DenoiserError, match=DENOISER_CALLS_2):
            run_call(pipe, case)
        assert counter.calls == 0
        build("sdxl")  # the tiny pipeline's own scheduler again: the attached runtime runs as before
        with one_thread():
            out, _ = run_call(pipe, case)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    finally:
        counter.remove()
        ad.remove()


def test_sd3_skip_guidance_layers_refused_before_any_work():
    """SD3's skip_guidance_layers calls the transformer a second time per step: refused at call, before the text
    encoders or the transformer run."""
    from pipeline_cases import plan_of, run_call

    pipe = build("sd3")
    case = dict(kind="sd3", steps=3, call={"skip_guidance_layers": [1]})
    ad = asyncdiff_rt.AsyncDiff(pipe, model_n=2, plan=plan_of(case), transport="local")
    counter = _Counter(pipe.text_encoder, pipe.transformer.transformer_blocks[0])
    try:
        with pytest.raises(asyncdiff_rt.ConfigError, match="skip_guidance_layers"):
            run_call(pipe, case)
        assert counter.calls == 0
    finally:
        counter.remove()
        ad.remove()
