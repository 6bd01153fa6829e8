"""Note [dead tail] (strategies/segments/stepper.py): in a round, every rank but the output's stops its forward after
its last owned block. Counted on a module past every block (the output norm) in one process (`local`: every rank
view runs here), and the result still equals the simulator; a LoRA scale other than 1 keeps the whole forward."""

from __future__ import annotations

import pytest
import torch
from pipeline_cases import build, call_kwargs, one_thread, plan_of, simulated

import asyncdiff_rt

ATOL = 1e-5
STEPS, WARM_UP = 4, 1
TAIL = {"sd15": "conv_norm_out", "sdxl": "conv_norm_out", "sd3": "norm_out", "flux": "norm_out"}


def _run(kind: str, plan: str, call: dict, stride: int = 1):
    case = dict(kind=kind, plan=plan, steps=STEPS, warm_up=WARM_UP, stride=stride, call=call)
    pipe = build(kind)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls, steps = [], []
    handle = getattr(denoiser, TAIL[kind]).register_forward_pre_hook(lambda m, a: calls.append(1))
    handle_steps = denoiser.register_forward_pre_hook(lambda m, a: steps.append(1))
    ad = asyncdiff_rt.AsyncDiff(pipe, plan=plan_of(case), stride=stride, warm_up=WARM_UP, transport="local")
    try:
        with one_thread(), torch.no_grad():
            out = pipe(**call_kwargs(case))[0].detach().clone()
    finally:
        ad.remove()
        handle.remove()
        handle_steps.remove()
    return out, len(calls), len(steps) - WARM_UP, case


@pytest.mark.parametrize("kind,plan", [("sd15", "default"), ("sdxl", "inside_attn"), ("sd3", "default"),
                                       ("flux", "default")])  # fmt: skip
def test_only_the_output_rank_runs_the_tail(kind, plan):
    out, tail_calls, rounds, case = _run(kind, plan, {})
    assert rounds >= 2 and tail_calls == WARM_UP + rounds  # the warm-up once, then each round the output's rank
    torch.testing.assert_close(out, simulated(case)[0], rtol=0, atol=ATOL)


def test_stride_2_keeps_both_output_ranks_whole():
    out, tail_calls, steps, case = _run("sd15", "default", {}, stride=2)
    rounds = (steps + 1) // 2  # a round computes two steps
    assert rounds >= 2 and tail_calls == WARM_UP + 2 * rounds  # ranks 1 and 2 both own the output's segment
    torch.testing.assert_close(out, simulated(case)[0], rtol=0, atol=ATOL)


def test_a_lora_scale_keeps_every_forward_whole():
    call = {"joint_attention_kwargs": {"scale": 0.5}}  # diffusers unscales LoRA layers at the forward's end
    out, tail_calls, rounds, case = _run("sd3", "default", call)
    assert tail_calls == WARM_UP + 2 * rounds
    torch.testing.assert_close(out, simulated(case)[0], rtol=0, atol=ATOL)
