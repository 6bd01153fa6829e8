"""What `asyncdiff-rt plan --model` and the benchmarks name: a built-in architecture with random weights, a tiny
pipeline, a local diffusers folder (only its denoiser is loaded) or a model id. On the ``meta`` device (the FLOP
cost model needs no weights) the denoiser is built from its config alone: no weights read, no memory used."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .archs import ARCHITECTURES, build_architecture
from .generate import from_pretrained_kwargs

__all__ = ["DenoiserOnly", "load_pipeline_for_planning"]


class DenoiserOnly:
    """A stand-in pipeline holding just a denoiser (``.unet`` or ``.transformer``) and the VAE scale factor: what
    ``plan_for`` needs, without text encoders or a VAE in memory."""

    def __init__(self, denoiser: nn.Module, vae_scale_factor: int = 8, name: str = ""):
        attr = "transformer" if "Transformer" in type(denoiser).__name__ else "unet"
        setattr(self, attr, denoiser)
        self.vae_scale_factor = vae_scale_factor
        self.name = name

    def __repr__(self) -> str:
        return f"DenoiserOnly({self.name or type(getattr(self, 'unet', None) or self.transformer).__name__})"


def load_pipeline_for_planning(
    model: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """What ``asyncdiff-rt plan --model`` names: a built-in architecture (sd15, sd21, sdxl, sd3; random weights),
    a tiny pipeline (``tiny:<kind>``), a local diffusers folder (only its denoiser is loaded) or a model id.
    ``device="meta"``: the denoiser from its config without weights (a tiny pipeline stays on the CPU: it is small,
    and its twin is made on meta when traced)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if model in ARCHITECTURES:
        return DenoiserOnly(build_architecture(model, device, dtype), 8, model)
    if model.startswith("tiny:"):
        from ..tiny import make_pipeline

        on = torch.device("cpu") if device.type == "meta" else device
        # built in dtype: a .to(dtype) afterwards makes diffusers warn about modules to keep in float32
        return make_pipeline(model.split(":", 1)[1], seed=0, dtype=dtype, device=on)
    import diffusers

    if device.type == "meta":
        return _denoiser_from_config(model, dtype)

    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            components = json.load(f)
        for attr in ("unet", "transformer"):
            entry = components.get(attr)
            if isinstance(entry, list) and len(entry) == 2 and entry[1]:
                cls = getattr(diffusers, entry[1])
                denoiser = cls.from_pretrained(model, subfolder=attr, **from_pretrained_kwargs(dtype)).to(device).eval()
                factor = 8
                vae_config = os.path.join(model, "vae", "config.json")
                if os.path.isfile(vae_config):
                    with open(vae_config) as f:
                        factor = _vae_scale_factor(json.load(f))
                return DenoiserOnly(denoiser, factor, os.path.basename(os.path.normpath(model)))
        raise ValueError(f"{model} has no unet or transformer in its model_index.json")
    return diffusers.DiffusionPipeline.from_pretrained(model, **from_pretrained_kwargs(dtype)).to(device)


def _vae_scale_factor(vae_config: dict | None) -> int:
    return 2 ** (len((vae_config or {}).get("block_out_channels", [0] * 4)) - 1)


def _denoiser_from_config(model: str, dtype: torch.dtype) -> DenoiserOnly:
    """The denoiser of a local folder or a model id, on meta from its config (only JSON files are read)."""
    import diffusers

    components = diffusers.DiffusionPipeline.load_config(model)
    for attr in ("unet", "transformer"):
        entry = components.get(attr)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            cls = getattr(diffusers, entry[1])
            with torch.device("meta"):
                denoiser = cls.from_config(cls.load_config(model, subfolder=attr))
            try:
                vae_config = diffusers.AutoencoderKL.load_config(model, subfolder="vae")
            except (OSError, ValueError):  # no VAE folder: the common factor
                vae_config = None
            name = os.path.basename(os.path.normpath(model))
            return DenoiserOnly(nn.Module.to(denoiser, dtype=dtype).eval(), _vae_scale_factor(vae_config), name)
    raise ValueError(f"{model} has no unet or transformer in its model_index.json")
