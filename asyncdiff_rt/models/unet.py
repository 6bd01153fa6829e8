"""UNet families: SD 1.5/2.1, SDXL (added text/time conditions), the x4 upscaler (noise level as class label),
Stable Video Diffusion (frames on axis 1) and AnimateDiff/UNet3D (frames on axis 2, folded batch-major)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import ModelAdapter, random_like

__all__ = ["UNetAdapter", "VideoUNetAdapter", "MotionUNetAdapter"]


@dataclass
class UNetAdapter(ModelAdapter):
    family: str = "unet"

    def default_batch(self, pipe: Any = None) -> int:
        # a guidance embedding (LCM-style time_cond_proj_dim) takes one row per image
        return 1 if self.config.get("time_cond_proj_dim") is not None else 2

    def _cross_dim(self) -> int:
        cross = self.config.get("cross_attention_dim", 768)
        return cross[0] if isinstance(cross, (list, tuple)) else cross

    def _sample(self, batch: int, h: int, w: int, dtype, device, overrides: dict) -> torch.Tensor:
        return random_like((batch, self.config.get("in_channels", 4), h, w), dtype, device)

    def _text(self, batch: int, length: int, dtype, device, overrides: dict) -> torch.Tensor:
        return random_like((batch, length, self._cross_dim()), dtype, device)

    def example_call(self, height, width, batch, dtype, device, pipe=None, **overrides):
        cfg = self.config
        h, w = self.latent_size(height, width, pipe)
        sample = self._sample(batch, h, w, dtype, device, overrides)
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": self._text(batch, self.text_length(pipe), dtype, device, overrides)
        }
        kwargs.update(self._extra(batch, dtype, device, pipe))
        if cfg.get("class_embed_type") is None and cfg.get("num_class_embeds"):
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)  # x4 upscaler: noise level
        kwargs.update(overrides)
        return (sample, torch.tensor(999.0, device=device)), kwargs

    def _extra(self, batch: int, dtype, device, pipe) -> dict[str, Any]:
        cfg = self.config
        if cfg.get("addition_embed_type") != "text_time":
            return {}
        add_dim = cfg.get("addition_time_embed_dim") or 256
        total = cfg.get("projection_class_embeddings_input_dim") or 2816
        te = getattr(getattr(pipe, "text_encoder_2", None), "config", None)
        text_dim = getattr(te, "projection_dim", None)
        if text_dim is None:
            text_dim = next((total - k * add_dim for k in (6, 5) if total - k * add_dim > 0), total)
        n_ids = (total - text_dim) // add_dim
        return {
            "added_cond_kwargs": {
                "text_embeds": random_like((batch, text_dim), dtype, device),
                "time_ids": random_like((batch, n_ids), dtype, device),
            }
        }


@dataclass
class VideoUNetAdapter(UNetAdapter):
    """Stable Video Diffusion: sample (batch, frames, channels, h, w); image embeddings and added time ids."""

    family: str = "svd"
    spatial_axes: tuple[int, int] = (3, 4)

    def _sample(self, batch, h, w, dtype, device, overrides):
        frames = overrides.pop("num_frames", self.config.get("num_frames", 25))
        return random_like((batch, frames, self.config.get("in_channels", 8), h, w), dtype, device)

    def _text(self, batch, length, dtype, device, overrides):
        return random_like((batch, 1, self._cross_dim()), dtype, device)

    def _extra(self, batch, dtype, device, pipe):
        cfg = self.config
        n_ids = cfg.get("projection_class_embeddings_input_dim", 768) // cfg.get("addition_time_embed_dim", 256)
        return {"added_time_ids": random_like((batch, n_ids), dtype, device)}


@dataclass
class MotionUNetAdapter(UNetAdapter):
    """AnimateDiff (UNetMotionModel) and UNet3D: sample (batch, channels, frames, h, w). AnimateDiff's pipeline
    repeats the text states per frame, batch-major (rows = batch * frames), so halving axis 0 still splits the
    guidance batch; UNet3D repeats them itself."""

    family: str = "motion"
    spatial_axes: tuple[int, int] = (3, 4)

    def _sample(self, batch, h, w, dtype, device, overrides):
        self._frames = overrides.pop("num_frames", 16)
        return random_like((batch, self.config.get("in_channels", 4), self._frames, h, w), dtype, device)

    def _text(self, batch, length, dtype, device, overrides):
        rows = batch * self._frames if type(self.denoiser).__name__ == "UNetMotionModel" else batch
        return random_like((rows, length, self._cross_dim()), dtype, device)
