"""Diffusion transformers: SD3 / SD3.5 (`SD3Transformer2DModel`): the timestep is a batch vector passed by
keyword, beside pooled projections; the patch embedding, time/text embeddings and output projection are
replicated glue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import ModelAdapter, random_like

__all__ = ["SD3Adapter"]


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
