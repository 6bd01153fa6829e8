"""The runtime on one GPU: CUDA-graph replay equals eager, `local` (segments in one process) equals the
simulator, model_n=1 on the graph path equals plain diffusers. fp32 tiny models."""

import pytest
import torch

from asyncdiff_rt import AsyncDiff, simulate
from asyncdiff_rt.tiny import call_kwargs, make_pipeline, output_of

pytestmark = pytest.mark.cuda

PLANS = {
    "sd15": [
        ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
        ["down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"],
        ["up_blocks.2", "up_blocks.3", "conv_out"],
    ],
    "sdxl": [
        ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block.attentions.0.transformer_blocks.0"],
        [
            "mid_block.resnets.0",
            "mid_block.resnets.1",
            "mid_block.attentions.0.transformer_blocks.1",
            "mid_block.attentions.0.transformer_blocks.2",
            "up_blocks.0",
            "up_blocks.1",
            "up_blocks.2",
            "conv_out",
        ],
    ],
    "sd3": [["transformer_blocks.0", "transformer_blocks.1"], ["transformer_blocks.2", "transformer_blocks.3"]],
}


def latents(pipe, kind, steps=6):
    kw = call_kwargs(kind, steps=steps, seed=0, device="cuda")
    kw["output_type"] = "latent"
    return output_of(pipe(**kw))


@pytest.mark.parametrize("kind", list(PLANS))
@pytest.mark.parametrize("stride", [1, 2])
def test_local_graphs_equal_simulator(kind, stride):
    pipe = make_pipeline(kind, device="cuda")
    kw = call_kwargs(kind, steps=6, seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=PLANS[kind], stride=stride, warm_up=2, **kw))
    exact = latents(pipe, kind)
    ad = AsyncDiff(pipe, plan=PLANS[kind], stride=stride, warm_up=2, transport="local", graphs=True)
    first, second = latents(pipe, kind), latents(pipe, kind)  # capture, then replay
    assert ad.captures > 0, "no graph was captured"
    ad.remove()
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert (first - exact).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_model_n1_graph_equals_plain(kind):
    pipe = make_pipeline(kind, device="cuda")
    plain = latents(pipe, kind)
    ad = AsyncDiff(pipe, model_n=1, warm_up=1, transport="local")
    got, again = latents(pipe, kind), latents(pipe, kind)
    assert ad.captures > 0
    ad.remove()
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_graph_equals_eager_local():
    pipe = make_pipeline("sdxl", device="cuda")
    ad = AsyncDiff(pipe, plan=PLANS["sdxl"], warm_up=1, transport="local", graphs=False)
    eager = latents(pipe, "sdxl")
    ad.remove()
    pipe = make_pipeline("sdxl", device="cuda")
    ad = AsyncDiff(pipe, plan=PLANS["sdxl"], warm_up=1, transport="local", graphs=True)
    graphed = latents(pipe, "sdxl")
    ad.remove()
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "world,case",
    [
        (2, dict(kind="sd15", plan=PLANS["sd15"][:1] + [PLANS["sd15"][1] + PLANS["sd15"][2]], steps=6)),
        (3, dict(kind="sd15", plan=PLANS["sd15"], steps=6)),
        (3, dict(kind="sdxl", plan=PLANS["sdxl"], stride=2, steps=7)),
        (2, dict(kind="sd3", plan=PLANS["sd3"], steps=6, time_shift=True)),
    ],
)
def test_processes_on_one_gpu_over_shm_equal_simulator(world, case):
    """The real multi-process runtime, several processes sharing the one GPU through page-locked shared memory."""
    from dist_cases import exact_gpu_math, run_cases

    from asyncdiff_rt.tools.launch import spawn

    exact_gpu_math()  # the workers run without TF32; the simulator here must too (cuDNN convs default to TF32)

    case = dict(case, device="cuda", transport="shm", warm_up=2)
    results = spawn(run_cases, world, [case], timeout_s=300)
    assert results[0][0]["status"] == "ok", results[0][0]
    got = results[0][0]["outputs"][0]
    pipe = make_pipeline(case["kind"], device="cuda")
    kw = call_kwargs(case["kind"], steps=case["steps"], seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(
        simulate(
            pipe,
            plan=case["plan"],
            stride=case.get("stride", 1),
            warm_up=2,
            time_shift=case.get("time_shift", False),
            **kw,
        )
    ).cpu()
    exact = output_of(pipe(**kw)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - exact).abs().max() > 1e-3


def test_out_of_order_timestep_on_gpu_is_refused_after_the_loop():
    """GPU timesteps are checked after the loop (one host read, Note [no host sync]), still naming the step."""
    from toy import OutOfOrderToy

    import asyncdiff_rt

    pipe = OutOfOrderToy(6, device="cuda")
    ad = AsyncDiff(pipe, plan=[["A"], ["B", "C"]], warm_up=1, transport="local")
    with pytest.raises(asyncdiff_rt.DenoiserError, match=r"step 2: the denoiser got timestep 7 but .*τ\[2\] is 8"):
        pipe()
    ad.remove()


def test_controlnet_blocks_local_graphs_equal_simulator():
    """ControlNet listed as blocks (the default) on the CUDA-graph path: ControlNet + UNet replayed per view."""
    from pipeline_cases import PLANS as CASE_PLANS

    plan = CASE_PLANS["sdxl_controlnet"]["default"]
    pipe = make_pipeline("sdxl_controlnet", device="cuda")
    kw = call_kwargs("sdxl_controlnet", steps=5, seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=plan, warm_up=2, **kw))
    ad = AsyncDiff(pipe, plan=plan, warm_up=2, transport="local", graphs=True)
    first, second = latents(pipe, "sdxl_controlnet", steps=5), latents(pipe, "sdxl_controlnet", steps=5)
    assert ad.captures > 0, "no graph was captured"
    ad.remove()
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("kind,stride", [("sdxl", 1), ("sdxl", 2), ("sd3", 1)])
def test_prepare_captures_what_the_first_call_needs(kind, stride):
    """After `prepare` with the call's own arguments, the first real call captures no new graph (issue 13)."""
    pipe = make_pipeline(kind, device="cuda")
    kw = call_kwargs(kind, steps=6, seed=0, device="cuda")
    kw["output_type"] = "latent"
    ad = AsyncDiff(pipe, plan=PLANS[kind], stride=stride, warm_up=2, transport="local", graphs=True)
    same = {k: v for k, v in kw.items() if k not in ("generator", "num_inference_steps", "height", "width")}
    ad.prepare(height=kw.get("height"), width=kw.get("width"), **same)
    prepared = ad.captures
    assert prepared > 0, "prepare captured nothing"
    got = output_of(pipe(**kw))
    assert ad.captures == prepared, f"the first call captured {ad.captures - prepared} new graph(s)"
    ad.remove()
    kw = call_kwargs(kind, steps=6, seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=PLANS[kind], stride=stride, warm_up=2, **kw))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_flux_local_graphs_equal_simulator():
    """FLUX.1 on the graph path: τ substituted as τ / 1000 in the latents' dtype (issue 18)."""
    from asyncdiff_rt.compiler.blocks import candidate_blocks

    pipe = make_pipeline("flux", device="cuda")
    blocks = candidate_blocks(pipe.transformer)
    plan = [blocks[:3], blocks[3:]]
    kw = call_kwargs("flux", steps=6, seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=plan, warm_up=2, time_shift=True, **kw))
    ad = AsyncDiff(pipe, plan=plan, warm_up=2, time_shift=True, transport="local", graphs=True)
    got = latents(pipe, "flux")
    assert ad.captures > 0
    ad.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
