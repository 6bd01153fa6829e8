"""Dropped weights (memory): each rank keeps its own blocks' weights and the replicated modules only."""

from __future__ import annotations

import torch

__all__ = ["with_parts", "drop_weights", "was_dropped", "DROPPED_HELP"]

DROPPED_HELP = "load the pipeline again, or attach with drop_weights=False to keep full weights"


def with_parts(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser and, for a composite (ControlNet + UNet), its parts: weights freed there stay freed."""
    return [denoiser, *(getattr(denoiser, p) for p in getattr(denoiser, "composite_parts", ()))]


def was_dropped(denoiser: torch.nn.Module) -> bool:
    return any(getattr(part, "_asyncdiff_rt_dropped", False) for part in with_parts(denoiser))


def drop_weights(denoiser: torch.nn.Module, blocks: list[str], owned: set[str]) -> int:
    """Free every parameter and buffer of the listed blocks not in `owned`; returns the bytes freed."""
    modules = dict(denoiser.named_modules())
    freed = 0
    for name in blocks:
        if name in owned:
            continue
        for t in list(modules[name].parameters()) + list(modules[name].buffers()):
            freed += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    for part in with_parts(denoiser):
        part._asyncdiff_rt_dropped = True
    return freed
