"""The patch simulator on tiny diffusers pipelines (CPU, fp32): exact where DESIGN §10 says exact, deterministic
and close-but-not-equal where it is stale, and refusing what it cannot split.

Latent rows must divide into patches x 2^downsamplings: SD 1.5 (3 downsamplings, VAE 8) takes 128 px for
P=2 and 192 px for P=3; SDXL (2 downsamplings) 64 and 96 px; the x4 upscaler's latents are its low-res input.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import UNet2DConditionModel

from asyncdiff_rt.simulators.patch import SYNC_MODES, simulate_patch
from asyncdiff_rt.tiny import call_kwargs, make_pipeline

STEPS = 3
STALE_MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "no_sync")
# (kind, patches) -> the call's size overrides
SIZES = {
    ("sd15", 2): dict(size=128),
    ("sd15", 3): dict(height=192, width=64),
    ("sdxl", 2): dict(size=64),
    ("sdxl", 3): dict(size=96),
    ("sd_upscale", 2): dict(size=16),
    ("sdxl_inpaint", 2): dict(size=64),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on shared cores their spin-waits cost seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def pipeline(kind):
    return make_pipeline(kind)


def kwargs(kind, patches, steps=STEPS):
    sizes = dict(SIZES[(kind, patches)])
    kw = call_kwargs(kind, steps=steps, output_type="latent", size=sizes.pop("size", None))
    kw.update(sizes)
    return kw


@functools.cache
def exact(kind, patches, steps=STEPS):
    return pipeline(kind)(**kwargs(kind, patches, steps)).images


def patched(kind, patches, steps=STEPS, **options):
    return simulate_patch(pipeline(kind), patches=patches, **options, **kwargs(kind, patches, steps)).images


def no_overrides(pipe):
    return all("forward" not in m.__dict__ for m in pipe.unet.modules())


# ---- exact where §10 says exact -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd_upscale", "sdxl_inpaint"])
def test_full_sync_equals_diffusers(kind):
    steps = 4 if kind == "sdxl_inpaint" else STEPS  # strength 0.75 of 4 steps: 3 denoiser calls
    got = patched(kind, 2, steps, warm_up=1, sync_mode="full_sync")
    assert (got - exact(kind, 2, steps)).abs().max().item() < 1e-4
    assert no_overrides(pipeline(kind))


@pytest.mark.parametrize("kind, patches", [("sd15", 2), ("sdxl", 2), ("sdxl", 3)])
def test_warm_up_over_every_step_equals_diffusers(kind, patches):
    reference = exact(kind, patches)
    calls = len(pipeline(kind).scheduler.timesteps)  # PNDM's loop (SD 1.5) has one step more than asked
    got = patched(kind, patches, warm_up=calls)  # the default corrected_async_gn, never reached
    assert (patched(kind, patches, warm_up=calls - 1) - reference).abs().max().item() > 1e-3  # one stale step
    assert (got - exact(kind, patches)).abs().max().item() < 1e-4


def test_one_patch_is_diffusers():
    got = simulate_patch(pipeline("sdxl"), patches=1, warm_up=1, **kwargs("sdxl", 2)).images
    assert (got - exact("sdxl", 2)).abs().max().item() < 1e-4


# ---- every mode: runs, deterministic, stale modes close but not exact --------------------------------------------


@functools.cache
def mode_result(kind, patches, mode):
    return patched(kind, patches, warm_up=1, sync_mode=mode)


@pytest.mark.parametrize("mode", SYNC_MODES)
@pytest.mark.parametrize("kind, patches", [("sd15", 2), ("sd15", 3), ("sdxl", 2), ("sdxl", 3)])
def test_every_mode_is_deterministic_and_stale_modes_are_close(kind, patches, mode):
    first = mode_result(kind, patches, mode)
    assert torch.equal(first, patched(kind, patches, warm_up=1, sync_mode=mode))
    error = (first - exact(kind, patches)).abs().max().item()
    scale = exact(kind, patches).abs().max().item()
    if mode == "full_sync":
        assert error < 1e-4
    elif mode == "naive":  # no exchange at all: further off than DistriFusion's default
        assert torch.isfinite(first).all() and error > mode_error(kind, patches, "corrected_async_gn")
    else:
        assert 1e-4 < error < 0.2 * scale


def mode_error(kind, patches, mode):
    return (mode_result(kind, patches, mode) - exact(kind, patches)).abs().max().item()


@pytest.mark.parametrize("kind, patches", [("sd15", 2), ("sdxl", 3)])
def test_modes_give_different_results(kind, patches):
    results = {m: mode_result(kind, patches, m) for m in [*STALE_MODES, "naive"]}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (results[a] - results[b]).abs().max().item() > 1e-5, (a, b)


# ---- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, patches, size, match",
    [
        ("sd15", 2, 64, "height 64 .*latent rows 8.* 2 x 8 = 16.*multiple of 128 pixels"),
        ("sdxl", 3, 64, "height 64 .*latent rows 8.* 3 x 4 = 12.*multiple of 96 pixels"),
    ],
)
def test_heights_the_patches_cannot_split_are_refused(kind, patches, size, match):
    pipe = pipeline(kind)
    with pytest.raises(ValueError, match=match):
        simulate_patch(pipe, patches=patches, **call_kwargs(kind, steps=1, output_type="latent", size=size))
    assert no_overrides(pipe)


def test_upscaler_height_is_refused_before_the_denoiser_computes():
    pipe, calls = pipeline("sd_upscale"), []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="latent height 24 does not split into 2 patches.*multiple of 16"):
            simulate_patch(pipe, patches=2, **call_kwargs("sd_upscale", steps=1, output_type="latent", size=24))
    finally:
        hook.remove()
    assert calls == [] and no_overrides(pipe)


def test_glue_padded_downsampling_is_refused_by_name():
    pipe = make_pipeline("sd15")
    config = {k: v for k, v in pipe.unet.config.items() if k != "_use_default_values"}  # else it keeps 1
    pipe.unet = UNet2DConditionModel.from_config({**config, "downsample_padding": 0})
    with pytest.raises(ValueError, match=r"down_blocks\.0\.downsamplers\.0\.conv: .*padding 0.*F\.pad"):
        simulate_patch(pipe, patches=2, **kwargs("sd15", 2))


@pytest.mark.parametrize("kind", ["svd", "animatediff"])
def test_video_pipelines_are_refused(kind):
    with pytest.raises(ValueError, match="does not support video denoisers"):
        simulate_patch(make_pipeline(kind), patches=2, **call_kwargs(kind, steps=1))
