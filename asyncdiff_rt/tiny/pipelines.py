"""Registry of the tiny random-weight pipelines: ``make_pipeline(kind)`` and ``call_kwargs(kind)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import flux, sd, sd3, video
from ._common import quiet_transformers

_BUILDERS: dict[str, Callable] = {
    "sd15": sd.make_sd15,
    "sd21": sd.make_sd21,
    "sdxl": sd.make_sdxl,
    "sd3": sd3.make_sd3,
    "sd35_medium": sd3.make_sd35_medium,
    "sd35_large": sd3.make_sd35_large,
    "flux": flux.make_flux,
    "flux_schnell": flux.make_flux_schnell,
    "sdxl_inpaint": sd.make_sdxl_inpaint,
    "sd_upscale": sd.make_sd_upscale,
    "sdxl_controlnet": sd.make_sdxl_controlnet,
    "svd": video.make_svd,
    "animatediff": video.make_animatediff,
    "demo": lambda seed=0: sd.make_sd15(seed, demo=True),
}

_KWARGS: dict[str, Callable] = {
    "sd15": sd.sd_kwargs,
    "sd21": sd.sd_kwargs,
    "sdxl": lambda *a, **k: sd.sd_kwargs(*a, guidance_scale=5.0, **k),
    "sd3": sd3.sd3_kwargs,
    "sd35_medium": sd3.sd3_kwargs,
    "sd35_large": sd3.sd3_kwargs,
    "flux": flux.flux_kwargs,
    "flux_schnell": flux.flux_schnell_kwargs,
    "sdxl_inpaint": sd.sdxl_inpaint_kwargs,
    "sd_upscale": sd.sd_upscale_kwargs,
    "sdxl_controlnet": sd.sdxl_controlnet_kwargs,
    "svd": video.svd_kwargs,
    "animatediff": video.animatediff_kwargs,
    "demo": lambda *a, **k: sd.sd_kwargs(*a, **{"size": 128, **k}),
}

KINDS: tuple[str, ...] = tuple(_BUILDERS)
VIDEO_KINDS = frozenset({"svd", "animatediff"})


def _check(kind: str) -> None:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(KINDS)}")


def make_pipeline(
    kind: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress_bar: bool = False,
):
    """Build the tiny random-weight pipeline ``kind``; the same seed gives identical weights."""
    _check(kind)
    with quiet_transformers():
        pipe = _BUILDERS[kind](seed=seed)
    pipe = pipe.to(device)
    if dtype != torch.float32:
        with quiet_transformers():
            pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def call_kwargs(
    kind: str,
    steps: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    output_type: str = "np",
    size: int | None = None,
) -> dict:
    """Keyword arguments for a fast ``pipe(**kwargs)`` call of the tiny pipeline ``kind``.

    ``size`` is the output's height and width (the low-res input's for "sd_upscale"); it must be a multiple of
    64 for the UNet kinds (VAE factor 8 times 3 UNet downsamplings; SDXL kinds: 32), of 8 for "sd_upscale" (its
    latents are the low-res size), of 16 for "sd3" / "sd35_*" (VAE 8 x patch 2) and for "flux" / "flux_schnell"
    (VAE 8 x 2x2 latent packing). Defaults: 64 (demo: 128, sd_upscale: 16 in, 64 out). Video kinds take 3 frames.
    FLUX kinds run without true CFG (``flux.flux_true_cfg_kwargs`` adds it). A fresh seeded
    ``torch.Generator`` on ``device`` is included, so each call of this function starts the same noise.
    """
    _check(kind)
    extra = {} if size is None else ({"low_res": size} if kind == "sd_upscale" else {"size": size})
    return _KWARGS[kind](steps, seed, device, output_type, **extra)


def expected_shape(kind: str, kwargs: dict) -> tuple[int, ...]:
    """Shape of ``output_of(pipe(**kwargs))`` for output_type "np" (batch, [frames,] height, width, 3)."""
    h, w = sd.expected_image_shape(kind, kwargs)
    if kind in VIDEO_KINDS:
        return (1, kwargs["num_frames"], h, w, 3)
    return (1, h, w, 3)


def output_of(out):
    """The images (or video frames) of a pipeline output object."""
    return out.frames if hasattr(out, "frames") else out.images


def denoiser_of(pipe) -> torch.nn.Module:
    """The denoiser the runtime cuts: ``pipe.transformer`` for DiTs, else ``pipe.unet`` (for AnimateDiff the
    UNetMotionModel the pipeline assembled from the UNet and the MotionAdapter)."""
    den = getattr(pipe, "transformer", None)
    return den if den is not None else pipe.unet
