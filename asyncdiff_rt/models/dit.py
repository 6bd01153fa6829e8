"""Diffusion transformers: FLUX.1, and SD3 / SD3.5 (`SD3Transformer2DModel`): the timestep is a batch vector passed by
keyword, beside pooled projections; the patch embedding, time/text embeddings and output projection are
replicated glue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import ModelAdapter, random_like

__all__ = ["FluxAdapter", "SD3Adapter"]


@dataclass
class SD3Adapter(ModelAdapter):
    family: str = "sd3"
    sample_arg: str = "hidden_states"

    def example_call(self, height, width, batch, dtype, device, pipe=None, **overrides):
        cfg = self.config
        h, w = self.latent_size(height, width, pipe)
        seq = overrides.pop("text_len", self.text_length(pipe) + overrides.pop("max_sequence_length", 256))
        kwargs: dict[str, Any] = {
            "hidden_states": random_like((batch, cfg["in_channels"], h, w), dtype, device),
            "encoder_hidden_states": random_like((batch, seq, cfg["joint_attention_dim"]), dtype, device),
            "pooled_projections": random_like((batch, cfg["pooled_projection_dim"]), dtype, device),
            "timestep": torch.full((batch,), 999.0, device=device),
        }
        kwargs.update(overrides)
        return (), kwargs


@dataclass
class FluxAdapter(ModelAdapter):
    """FLUX.1 (`FluxTransformer2DModel`): packed 2x2 latent tokens (batch, (h/2)(w/2), 64), the timestep passed as
    τ / 1000 (cast to the latents' dtype first), a `guidance` vector (FLUX.1-dev) instead of a CFG batch, and
    position ids without a batch axis. True CFG (`true_cfg_scale > 1`) calls the transformer twice per step."""

    family: str = "flux"
    sample_arg: str = "hidden_states"
    spatial_axes: tuple[int, int] = (1, 1)  # tokens are row-major: rows are contiguous runs of the token axis
    timestep_divisor: float = 1000.0
    guidance_in_batch: bool = False
    unbatched: frozenset[str] = frozenset({"txt_ids", "img_ids", "joint_attention_kwargs"})

    def default_resolution(self, pipe: Any = None) -> tuple[int, int]:
        size = getattr(pipe, "default_sample_size", None) or 128  # FluxPipeline: 128 latent rows, VAE factor 8
        factor = getattr(pipe, "vae_scale_factor", None) or 8
        return int(size) * int(factor), int(size) * int(factor)

    def latent_size(self, height: int, width: int, pipe: Any = None) -> tuple[int, int]:
        factor = 2 * (getattr(pipe, "vae_scale_factor", None) or 8)  # latents are packed 2x2 into tokens
        if height % factor or width % factor:
            raise ValueError(f"FLUX height and width must be multiples of {factor}, got {height}x{width}")
        return height // factor, width // factor

    def example_call(self, height, width, batch, dtype, device, pipe=None, **overrides):
        cfg = self.config
        h, w = self.latent_size(height, width, pipe)
        text_len = overrides.pop("max_sequence_length", 512)
        ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(h, device=device, dtype=dtype)[:, None]
        ids[..., 2] += torch.arange(w, device=device, dtype=dtype)[None, :]
        kwargs: dict[str, Any] = {
            "hidden_states": random_like((batch, h * w, cfg["in_channels"]), dtype, device),
            "timestep": torch.full((batch,), 1.0, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device) if cfg.get("guidance_embeds") else None,
            "pooled_projections": random_like((batch, cfg["pooled_projection_dim"]), dtype, device),
            "encoder_hidden_states": random_like((batch, text_len, cfg["joint_attention_dim"]), dtype, device),
            "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
            "img_ids": ids.reshape(h * w, 3),
            "joint_attention_kwargs": {},
            "return_dict": False,
        }
        kwargs.update(overrides)
        return (), kwargs
