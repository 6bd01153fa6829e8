"""Set-up behaviour of AsyncDiff (DESIGN §2, §4): prepare, a new resolution on the same AsyncDiff, a pipeline
moved or offloaded after attaching, remove, and the plan it exposes."""

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt import AsyncDiff, ConfigError, Plan, simulate
from asyncdiff_rt.tiny import call_kwargs, make_pipeline, output_of

PLAN = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
    ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]


def run(pipe, size, steps=4):
    kw = call_kwargs("sdxl", steps=steps, seed=0, size=size)
    kw["output_type"] = "latent"
    return output_of(pipe(**kw))


def simulated(size, steps=4):
    kw = call_kwargs("sdxl", steps=steps, seed=0, size=size)
    kw["output_type"] = "latent"
    return output_of(simulate(make_pipeline("sdxl"), plan=PLAN, warm_up=1, **kw))


def test_new_resolution_keeps_the_plan_and_retraces():
    pipe = make_pipeline("sdxl")
    ad = AsyncDiff(pipe, plan=PLAN, warm_up=1, transport="local")
    first_hash = ad.plan.hash()
    small = run(pipe, 64)
    trace_small = ad.stepper.trace
    large = run(pipe, 128)
    assert ad.stepper.trace is not trace_small  # traced again for the new shapes
    assert ad.plan.hash() == first_hash
    again = run(pipe, 64)
    ad.remove()
    torch.testing.assert_close(small, simulated(64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(large, simulated(128), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, small, rtol=0, atol=0)


def test_prepare_traces_up_front():
    pipe = make_pipeline("sdxl")
    ad = AsyncDiff(pipe, plan=PLAN, warm_up=1, transport="local")
    kw = call_kwargs("sdxl", steps=4, seed=0, size=64)
    ad.prepare(height=64, width=64, prompt=kw["prompt"], negative_prompt=kw.get("negative_prompt"))
    assert ad.stepper.trace is not None and ad.stepper.store, "prepare did not trace or allocate"
    prepared = ad.stepper.trace
    out = run(pipe, 64)
    assert ad.stepper.trace is prepared  # the first real call reused the prepared shapes
    ad.remove()
    torch.testing.assert_close(out, simulated(64), rtol=1e-5, atol=1e-5)


def test_moved_pipeline_raises_clearly():
    pipe = make_pipeline("sd15")
    ad = AsyncDiff(pipe, model_n=2, plan=[["conv_in", "down_blocks.0"], ["mid_block", "conv_out"]], transport="local")
    pipe.to(torch.float64)
    with pytest.raises(ConfigError, match="moved"):
        run_sd15(pipe)
    ad.remove()


def test_offloaded_pipeline_raises_clearly():
    pipe = make_pipeline("sd15")
    pipe.unet.conv_in._hf_hook = object()  # what accelerate's offload hooks leave on a module
    with pytest.raises(ConfigError, match="offload"):
        AsyncDiff(pipe, model_n=2, plan=[["conv_in"], ["conv_out"]], transport="local")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and "forward" not in pipe.unet.__dict__


def run_sd15(pipe):
    kw = call_kwargs("sd15", steps=3, seed=0)
    kw["output_type"] = "latent"
    return pipe(**kw)


def test_remove_restores_plain_diffusers_and_plan_is_json():
    pipe = make_pipeline("sd15")
    plain = output_of(run_sd15(pipe))
    cls = type(pipe)
    ad = AsyncDiff(pipe, plan=[["conv_in", "down_blocks.0"], ["mid_block", "conv_out"]], transport="local")
    assert type(pipe) is not cls and type(pipe).__name__ == cls.__name__
    restored = Plan.from_json(ad.plan.to_json())
    assert restored.hash() == ad.plan.hash() and restored.segments[1].blocks == ["mid_block", "conv_out"]
    ad.remove()
    assert type(pipe) is cls and "forward" not in pipe.unet.__dict__
    torch.testing.assert_close(output_of(run_sd15(pipe)), plain, rtol=0, atol=0)


def test_denoiser_called_out_of_timestep_order_is_refused():
    from toy import OutOfOrderToy

    pipe = OutOfOrderToy(6)
    ad = AsyncDiff(pipe, plan=[["A"], ["B", "C"]], warm_up=1, transport="local")
    with pytest.raises(asyncdiff_rt.DenoiserError, match=r"step 2: the denoiser got timestep 7 but .*τ\[2\] is 8"):
        pipe()
    ad.remove()


def test_model_n_that_disagrees_with_the_plan_is_refused():
    """An explicit model_n other than the plan's segment count is refused, naming both (it used to be replaced)."""
    pipe = make_pipeline("sdxl")
    three = [PLAN[0][:2], PLAN[0][2:], PLAN[1]]
    with pytest.raises(ConfigError, match="model_n=2 but the plan has 3 segments"):
        AsyncDiff(pipe, model_n=2, plan=three, transport="local")
    assert "forward" not in pipe.unet.__dict__
    ad = AsyncDiff(pipe, plan=three, transport="local")  # left out, the plan decides
    assert ad.model_n == 3
    ad.remove()
