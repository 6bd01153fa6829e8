"""What the runtime, the compiler and the simulators know about one family of denoisers, declared as data.

A `ModelAdapter` says how the pipeline calls the denoiser (its signature), which axis of each argument is the
batch (what CFG parallelism splits), which axes of the sample are the image rows and columns (what patch
parallelism splits; docs/strategies.md), which top-level modules stay replicated, how the pipeline turns the
scheduler's timestep τ into the value it passes (`timestep_divisor`: 1 for the SD family, 1000 for FLUX), and how
to build an example call at a resolution (for tracing and costing). One adapter per family lives beside this
file; `adapter_for` picks it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["REPLICATED_TOP_LEVEL", "ModelAdapter", "class_forward", "config_of", "pipe_int", "random_like"]


# Top-level children of UNets/DiTs that stay replicated: cheap embeddings and output norms (docs/strategies.md).
REPLICATED_TOP_LEVEL = frozenset(
    {
        "time_proj",
        "time_embedding",
        "time_embed_act",
        "class_embedding",
        "add_time_proj",
        "add_embedding",
        "encoder_hid_proj",
        "position_net",
        "conv_norm_out",
        "conv_act",
        # DiTs
        "pos_embed",
        "time_text_embed",
        "context_embedder",
        "norm_out",
        "proj_out",
        "x_embedder",
        "t_embedder",
        "time_embed",
        "patch_embed",
        "rope",
        "pos_embedder",
        "image_proj",
    }
)


def class_forward(module: nn.Module) -> Any:
    """The module's own forward, bound, even while an instance override (ours, or a diffusers hook) is in place."""
    return type(module).forward.__get__(module)


def config_of(denoiser: nn.Module) -> dict[str, Any]:
    return dict(getattr(denoiser, "config", {}) or {})


def pipe_int(pipe: Any, attr: str, default: int) -> int:
    value = getattr(pipe, attr, None) if pipe is not None else None
    return int(value) if isinstance(value, int) and value > 0 else default


def random_like(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype, device=device)
    return torch.zeros(*shape, dtype=dtype, device=device)


@dataclass
class ModelAdapter:
    """One denoiser family. Subclasses fill the data fields and `example_call`."""

    denoiser: nn.Module
    family: str = "unknown"
    sample_arg: str = "sample"  # the first argument: the latents the denoiser refines
    batch_axis: int = 0  # of every batch-carrying argument (video UNets fold frames into axis 0 batch-major)
    spatial_axes: tuple[int, int] = (2, 3)  # (rows, columns) of the sample
    timestep_divisor: float = 1.0  # the pipeline passes τ[k] / timestep_divisor (FLUX: 1000)
    replicated: frozenset[str] = field(default_factory=frozenset)  # top-level modules never listed as blocks
    guidance_in_batch: bool = True  # CFG doubles the batch (False: guidance-distilled, e.g. FLUX.1-dev)
    unbatched: frozenset[str] = frozenset()  # tensor arguments without a batch axis (FLUX's position ids)

    def __post_init__(self) -> None:
        self.replicated = REPLICATED_TOP_LEVEL & {n for n, _ in self.denoiser.named_children()}

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(class_forward(self.denoiser))

    @property
    def config(self) -> dict[str, Any]:
        return config_of(self.denoiser)

    def timestep_as_passed(self, tau: torch.Tensor | float, like: Any) -> Any:
        """τ[k] as the pipeline would pass it, in the shape and dtype of the timestep it passed (`like`): cast
        first, then divided, as the pipelines do. A tensor `tau` on `like`'s device costs no host sync."""
        if isinstance(like, torch.Tensor):
            t = torch.as_tensor(tau).to(device=like.device, dtype=like.dtype).expand(like.shape)
            return t / self.timestep_divisor if self.timestep_divisor != 1 else t
        return type(like)(float(tau) / self.timestep_divisor)

    def default_batch(self, pipe: Any = None) -> int:
        """Denoiser rows per image with the pipeline's default guidance: 2 with CFG in the batch, else 1."""
        return 2 if self.guidance_in_batch else 1

    def default_resolution(self, pipe: Any = None) -> tuple[int, int]:
        """The pipeline's default output size in pixels: the denoiser's sample size times the VAE scale factor."""
        size = self.config.get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        factor = pipe_int(pipe, "vae_scale_factor", 8)
        return int(size) * factor, int(size) * factor

    def latent_size(self, height: int, width: int, pipe: Any = None) -> tuple[int, int]:
        vae = pipe_int(pipe, "vae_scale_factor", 8)
        if height % vae or width % vae:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {vae}, got {height}x{width}")
        return height // vae, width // vae

    def text_length(self, pipe: Any = None, default: int = 77) -> int:
        tok = getattr(pipe, "tokenizer", None) if pipe is not None else None
        length = getattr(tok, "model_max_length", None)
        return length if isinstance(length, int) and length < 10000 else default

    def example_call(
        self, height: int, width: int, batch: int, dtype: torch.dtype, device: Any, pipe: Any = None, **overrides: Any
    ) -> tuple[tuple, dict]:
        """(args, kwargs) shaped like the pipeline's denoiser call at `height` x `width` pixels."""
        raise ValueError(
            f"asyncdiff_rt does not know how {type(self.denoiser).__name__} is called; pass its inputs to "
            "plan_for_denoiser(args=, kwargs=)"
        )
