"""ControlNet listed as blocks (asyncdiff_rt/controlnet.py): the composite is exact, the runtime's choice of mode,
its refusals, its removal, and the weights each rank keeps. The asynchronous runs against the simulator are in
tests/test_pipelines.py (sdxl_controlnet cases, both modes)."""

from __future__ import annotations

import pytest
import torch

from asyncdiff_rt import AsyncDiff, ConfigError, simulate
from asyncdiff_rt.models.controlnet import ControlledUNet, ControlNetAsBlocks
from asyncdiff_rt.models.denoiser import find_denoiser
from asyncdiff_rt.tiny import call_kwargs, make_pipeline, output_of
from asyncdiff_rt.tools.launch import spawn

KIND = "sdxl_controlnet"


def latents(pipe, steps=3, **extra):
    kw = call_kwargs(KIND, steps=steps, seed=0)
    kw.update(output_type="latent", **extra)
    return output_of(pipe(**kw))


@pytest.mark.parametrize(
    "extra",
    [{}, {"guess_mode": True}, {"guidance_scale": 1.0}, {"control_guidance_end": 0.5}],
    ids=["cfg", "guess_mode_cfg", "no_cfg", "control_guidance_end"],
)
def test_composite_equals_plain_diffusers(extra):
    """ControlNet + UNet as one denoiser computes exactly what the pipeline computes (guess mode puts the
    residuals behind zeros for the unconditional half; control_guidance_end changes the scale per step)."""
    pipe = make_pipeline(KIND)
    plain = latents(pipe, **extra)
    composite = ControlNetAsBlocks(pipe)
    assert isinstance(find_denoiser(pipe)[1], ControlledUNet)
    got = latents(pipe, **extra)
    composite.remove()
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert find_denoiser(pipe)[1] is pipe.unet


def test_auto_lists_the_controlnet_and_remove_restores():
    pipe = make_pipeline(KIND)
    plain = latents(pipe)
    ad = AsyncDiff(pipe, model_n=2, transport="local")
    assert any(b.startswith("controlnet.") for b in ad.plan.blocks)
    assert any(b.startswith("unet.") for b in ad.plan.blocks)
    ad.remove()
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.controlnet.__dict__
    torch.testing.assert_close(latents(pipe), plain, rtol=0, atol=0)
    ad = AsyncDiff(pipe, model_n=2, transport="local", controlnet="replicated")
    assert not any(b.startswith(("controlnet.", "unet.")) for b in ad.plan.blocks)
    ad.remove()


def test_local_runtime_equals_simulator_in_both_modes():
    pipe = make_pipeline(KIND)

    def kw():  # a fresh generator per call
        return dict(call_kwargs(KIND, steps=4, seed=0), output_type="latent")

    outs = {}
    for mode in ("blocks", "replicated"):
        ad = AsyncDiff(pipe, model_n=2, transport="local", controlnet=mode)
        plan = ad.plan
        got = output_of(pipe(**kw()))
        ad.remove()
        expected = output_of(simulate(pipe, plan=plan, controlnet=mode, **kw()))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outs[mode] = got
    assert (outs["blocks"] - outs["replicated"]).abs().max() > 1e-3  # the modes differ: stale vs fresh residuals


@pytest.mark.parametrize(
    "kind,mode,match",
    [
        (KIND, "sideways", "controlnet must be 'auto', 'blocks' or 'replicated'"),
        ("sd15", "blocks", "needs a ControlNet pipeline"),
    ],
)
def test_bad_controlnet_option_refused_before_any_work(kind, mode, match):
    pipe = make_pipeline(kind)
    with pytest.raises(ConfigError, match=match):
        AsyncDiff(pipe, model_n=2, transport="local", controlnet=mode)
    assert "forward" not in pipe.unet.__dict__ and "_asyncdiff_rt_denoiser" not in pipe.__dict__


def test_failed_construction_leaves_the_pipeline_unchanged():
    pipe = make_pipeline(KIND)
    with pytest.raises(ConfigError, match="stride must be 1 or 2"):
        AsyncDiff(pipe, model_n=2, stride=3, transport="local", controlnet="blocks")
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.controlnet.__dict__
    assert find_denoiser(pipe)[1] is pipe.unet


def _bytes_worker(rank: int, world: int, mode: str) -> tuple[int, int, int]:
    """(bytes this rank holds, its own blocks + the replicated modules counted apart, the full denoiser's)."""
    from dist_cases import own_plus_replicated_bytes

    from asyncdiff_rt.models.controlnet import controlnet_mode

    pipe = make_pipeline(KIND, seed=0)
    ad = AsyncDiff(pipe, model_n=2, transport="gloo", controlnet=mode, height=64, width=64)
    held = ad.parameter_bytes()
    plan, owned = ad.plan, set(ad.plan.segments[rank].blocks)
    ad.remove()
    full_pipe = make_pipeline(KIND, seed=0)
    with controlnet_mode(full_pipe, mode):
        full = find_denoiser(full_pipe)[1]
        expected = own_plus_replicated_bytes(full, plan, owned)
        total = sum(t.numel() * t.element_size() for t in list(full.parameters()) + list(full.buffers()))
    return held, expected, total


def test_blocks_mode_splits_the_controlnet_weights():
    """Listed as blocks, each rank keeps exactly its own ControlNet and UNet blocks plus the replicated modules;
    replicated, the denoiser is the UNet alone (the ControlNet stays whole on every rank, outside it)."""
    pipe = make_pipeline(KIND)
    controlnet = sum(t.numel() * t.element_size() for t in pipe.controlnet.parameters())
    blocks = spawn(_bytes_worker, 2, "blocks", timeout_s=300)
    replicated = spawn(_bytes_worker, 2, "replicated", timeout_s=300)
    for rank, (held, expected, total) in enumerate(blocks):
        assert held == expected, f"blocks, rank {rank}: holds {held} B, own + replicated is {expected} B"
        assert held < total
    for rank, (held, expected, _) in enumerate(replicated):
        assert held == expected, f"replicated, rank {rank}: holds {held} B, own + replicated is {expected} B"
    # the composite counts the ControlNet; split across the ranks, both together hold less than twice all of it
    assert blocks[0][2] == replicated[0][2] + controlnet
    assert blocks[0][0] + blocks[1][0] < 2 * blocks[0][2]


def test_several_controlnets_stay_replicated():
    """With several ControlNets, "auto" keeps them replicated and "blocks" refuses, naming the way out."""
    from diffusers import MultiControlNetModel

    pipe = make_pipeline(KIND)
    pipe.controlnet = MultiControlNetModel([pipe.controlnet])
    with pytest.raises(ConfigError, match="supports one ControlNetModel, not MultiControlNetModel.*'replicated'"):
        AsyncDiff(pipe, model_n=2, transport="local", controlnet="blocks")
    ad = AsyncDiff(pipe, model_n=2, transport="local")
    assert not any(b.startswith(("controlnet.", "unet.")) for b in ad.plan.blocks)
    ad.remove()
