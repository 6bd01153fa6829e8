"""Plans the tracer and partitioner make (fine granularity: cuts inside Transformer2DModels) give the same result
in the runtime as in the simulator, on every tiny pipeline. The runtime exchanges only the outputs the trace says
a rank reads and hands zeros for the rest, so an edge the tracer missed shows up here as a wrong result."""

import pytest
import torch

from asyncdiff_rt import AsyncDiff, plan_for, simulate
from asyncdiff_rt.tiny import call_kwargs, make_pipeline, output_of

KINDS = [
    "sd15", "sd21", "sdxl", "sd3", "sd35_medium", "sdxl_inpaint", "sd_upscale", "sdxl_controlnet", "svd", "animatediff",
    "flux",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def latents(pipe, kind):
    kw = call_kwargs(kind, steps=4, seed=0)
    kw["output_type"] = "latent"
    return output_of(pipe(**kw))


@pytest.mark.parametrize("kind", KINDS)
def test_traced_plan_runtime_equals_simulator(kind):
    pipe = make_pipeline(kind, seed=0)
    overrides = {"max_sequence_length": 32} if kind in ("sd3", "sd35_medium", "flux") else {}
    plan = plan_for(pipe, 3, repeats=1, cache=False, **overrides)
    assert plan.model_n == 3 and len(plan.blocks) >= 3
    kw = call_kwargs(kind, steps=4, seed=0)
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=plan, warm_up=1, **kw))
    ad = AsyncDiff(pipe, plan=plan, warm_up=1, transport="local")
    got = latents(pipe, kind)
    ad.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - latents(pipe, kind)).abs().max() > 1e-4  # asynchronous differs from the exact run
