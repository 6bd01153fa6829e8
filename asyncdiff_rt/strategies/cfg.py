"""CFG parallelism (docs/strategies.md): two halves of the ranks each compute one half of the guidance batch.

diffusers orders the guidance batch [unconditional, conditional] and the two halves never interact inside the
denoiser, so half h = global rank // inner computes rows [h B/2, (h+1) B/2) of every batch-carrying argument
(the model adapter says which arguments carry no batch), runs its strategy on them with its own ranks, and after
every denoiser call swaps its half of the output with its partner (global rank ± inner, on the communication
stream: no host sync), so every rank hands the full-batch output to the pipeline, whose guidance code runs
unchanged. The result equals the same configuration without it, up to batch-1 against batch-2 kernel rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..models.denoiser import first_tensor, replace_first_tensor

__all__ = ["CfgSplit"]


class CfgSplit:
    """The CFG dimension of one rank: `split` a denoiser call to this half, `join` its output with the partner's."""

    def __init__(self, adapter: Any, half: int, partner: int, world: Any):
        self.adapter, self.half, self.partner, self.world = adapter, half, partner, world

    def check_call(self, pipe: Any, kwargs: dict) -> None:
        """Before the call: refuse one without classifier-free guidance (nothing to split), naming cfg_parallel."""
        scale = kwargs.get("guidance_scale", kwargs.get("max_guidance_scale"))
        if scale is not None and scale <= 1:
            raise ConfigError(
                f"cfg_parallel=True needs classifier-free guidance, but this call has guidance_scale={scale} (<= 1: "
                "no unconditional half to split off); raise the guidance scale or attach without cfg_parallel"
            )
        if (kwargs.get("true_cfg_scale") or 1.0) > 1:
            raise ConfigError(
                "cfg_parallel=True does not split FLUX's true CFG yet (two transformer calls per step, not a batch of "
                "two halves): leave true_cfg_scale at 1"
            )
        if kwargs.get("guess_mode"):
            raise ConfigError(
                "cfg_parallel=True cannot split a ControlNet in guess mode (its ControlNet sees the conditional half "
                "only): leave guess_mode off or attach without cfg_parallel"
            )

    def split(self, pipe: Any, bound: Any, sample: torch.Tensor) -> tuple[tuple, dict]:
        """This half's rows of every batch-carrying argument of the call."""
        batch = sample.shape[0]
        if getattr(pipe, "do_classifier_free_guidance", True) is False or batch % 2:
            raise ConfigError(
                f"cfg_parallel=True: the pipeline sends the denoiser a batch of {batch} without classifier-free "
                "guidance (no [unconditional, conditional] halves to split); raise the guidance scale or attach "
                "without cfg_parallel"
            )

        def take(x: Any) -> Any:
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] % batch or x.shape[0] < batch:
                return x
            rows = x.shape[0] // 2  # a multiple of the batch (frames folded batch-major): still two halves
            return x[self.half * rows : (self.half + 1) * rows]

        arguments = {
            k: (v if k in self.adapter.unbatched else pytree.tree_map(take, v)) for k, v in bound.arguments.items()
        }
        rebound = type(bound)(bound.signature, arguments)
        return rebound.args, rebound.kwargs

    def join(self, out: Any, step: int) -> Any:
        """The full-batch output: this half's ε and the partner's, in batch order."""
        mine = first_tensor(out).contiguous()
        theirs = torch.empty_like(mine)
        self.world.exchange(step, {self.partner: [mine]}, {self.partner: [theirs]})
        halves = (mine, theirs) if self.half == 0 else (theirs, mine)
        return replace_first_tensor(out, torch.cat(halves, dim=0))
