"""Model adapters: what each denoiser family declares as data (models/base.py), and `adapter_for` that picks one.

The helpers below are the adapter's answers for a bare denoiser, for callers that hold no adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ModelAdapter, class_forward
from .dit import FluxAdapter, SD3Adapter
from .unet import MotionUNetAdapter, UNetAdapter, VideoUNetAdapter

__all__ = [
    "ModelAdapter",
    "adapter_for",
    "class_forward",
    "default_batch",
    "default_resolution",
    "example_inputs",
]

_BY_CLASS: dict[str, type[ModelAdapter]] = {
    "UNet2DConditionModel": UNetAdapter,
    "UNetSpatioTemporalConditionModel": VideoUNetAdapter,
    "UNetMotionModel": MotionUNetAdapter,
    "UNet3DConditionModel": MotionUNetAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
}


def adapter_for(denoiser: nn.Module) -> ModelAdapter:
    """The adapter of `denoiser`'s family: by class, then by the shape of its config (a subclass or a look-alike),
    else a generic one that can drive the denoiser but not build an example call for it."""
    compose = getattr(denoiser, "adapter", None)  # composites (ControlNet + UNet) know their own
    if compose is not None:
        return compose()
    for cls in type(denoiser).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__](denoiser)
    cfg = dict(getattr(denoiser, "config", {}) or {})
    if "joint_attention_dim" in cfg and "pooled_projection_dim" in cfg:
        return SD3Adapter(denoiser)
    if "down_blocks" in dict(denoiser.named_children()):
        return UNetAdapter(denoiser)
    return ModelAdapter(denoiser)


def example_inputs(
    denoiser: nn.Module,
    height: int,
    width: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device | str,
    pipe: Any = None,
    **overrides: Any,
) -> tuple[tuple, dict]:
    """(args, kwargs) shaped like the pipeline's denoiser call at `height` x `width` pixels; `overrides` replace
    or add keyword arguments (`num_frames` for video, `text_len`, ControlNet residuals)."""
    return adapter_for(denoiser).example_call(height, width, batch, dtype, device, pipe, **overrides)


def default_batch(denoiser: nn.Module, pipe: Any = None) -> int:
    return adapter_for(denoiser).default_batch(pipe)


def default_resolution(pipe: Any, denoiser: nn.Module) -> tuple[int, int]:
    return adapter_for(denoiser).default_resolution(pipe)
