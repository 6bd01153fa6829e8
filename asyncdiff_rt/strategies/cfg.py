"""CFG parallelism (docs/strategies.md): two halves of the ranks each compute one half of the guidance batch.

diffusers orders the guidance batch [unconditional, conditional] and the two halves never interact inside the
denoiser, so half h = global rank // inner computes rows [h B/2, (h+1) B/2) of every batch-carrying argument
(the model adapter says which arguments carry no batch), runs its strategy on them with its own ranks, and after
every denoiser call swaps its half of the output with its partner (global rank ± inner, on the communication
stream: no host sync), so every rank hands the full-batch output to the pipeline, whose guidance code runs
unchanged. The result equals the same configuration without it, up to batch-1 against batch-2 kernel rounding.

Note [true CFG pairs]
    FLUX's true CFG (`true_cfg_scale > 1` with a negative prompt) forms no batch of two halves: the pipeline calls
    the transformer twice per step, with the prompt (call 2k) and then the negative prompt (call 2k + 1), each of
    batch B, and mixes `neg + scale * (pos - neg)` only after the second call. So half 1 computes the prompt's
    call and half 0 the negative one (the unconditional half, as in a batch). The half that does not compute the
    prompt's call hands the pipeline a buffer there, which nothing reads before the second call; at the second
    call the halves swap their outputs into it and into a fresh one (on the communication stream: the pipeline's
    mixing, queued after, sees them). Each half's strategy sees one call per step. Exact: every call is computed
    once, as plain diffusers computes it, at its own batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..models.denoiser import first_tensor, replace_first_tensor

__all__ = ["CfgSplit", "uses_true_cfg"]


def uses_true_cfg(kwargs: dict) -> bool:
    """A call of FLUX's true CFG: the transformer runs once with the prompt and once with the negative prompt."""
    negative = kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
    return (kwargs.get("true_cfg_scale") or 1.0) > 1 and negative


class CfgSplit:
    """The CFG dimension of one rank: `split` a denoiser call to this half, `join` its output with the partner's."""

    def __init__(self, adapter: Any, half: int, partner: int, world: Any, segments: int = 1):
        self.adapter, self.half, self.partner, self.world = adapter, half, partner, world
        self.segments = segments  # model_n of each half's strategy
        self.pairs = False  # this call: FLUX true CFG, two denoiser calls per step (Note [true CFG pairs])
        self._kept: Any = None  # pairs: the prompt call's output (half 1) or the buffer handed out for it (half 0)

    def check_call(self, pipe: Any, kwargs: dict) -> None:
        """Before the call: refuse one without classifier-free guidance (nothing to split), naming cfg_parallel."""
        scale = kwargs.get("guidance_scale", kwargs.get("max_guidance_scale"))
        if scale is not None and scale <= 1 and not uses_true_cfg(kwargs):
            raise ConfigError(
                f"cfg_parallel=True needs classifier-free guidance, but this call has guidance_scale={scale} (<= 1: "
                "no unconditional half to split off); raise the guidance scale or attach without cfg_parallel"
            )
        self.pairs, self._kept = uses_true_cfg(kwargs), None
        if self.pairs and self.segments > 1:
            raise ConfigError(
                f"cfg_parallel=True splits FLUX's true CFG (true_cfg_scale > 1 with a negative prompt: two transformer "
                f"calls per step) only with model_n=1 per half, not model_n={self.segments}: use model_n=1, or leave "
                "true_cfg_scale at 1 to run segments"
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

    # ---- true CFG pairs (Note [true CFG pairs]) ---------------------------------------------------------------------
    def computes(self, call: int) -> bool:
        """Whether this half computes denoiser call `call` of a true-CFG loop (2k: prompt, 2k + 1: negative)."""
        return call % 2 == (1 if self.half == 0 else 0)

    def pair(self, out: Any, call: int, sample: torch.Tensor, return_dict: bool) -> Any:
        """The output the pipeline gets at true-CFG call `call`: `out` where this half computed it (None
        otherwise); at the second call of a step both halves swap what the other needs."""
        step = call // 2
        if call % 2 == 0:
            if out is not None:  # half 1: the prompt's output, sent at the negative call
                self._kept = first_tensor(out).contiguous()
                return out
            self._kept = torch.empty_like(sample)  # half 0: filled at the negative call, read by the pipeline after
            return _output(self._kept, return_dict)
        if out is not None:  # half 0: the negative output out, the prompt's into the buffer handed out before
            mine = first_tensor(out).contiguous()
            if mine.shape != self._kept.shape:
                raise ConfigError(
                    f"cfg_parallel=True with true CFG: the transformer's output {tuple(mine.shape)} differs from its "
                    f"input {tuple(self._kept.shape)}, so the prompt call's output cannot be received in place"
                )
            self.world.exchange(step, {self.partner: [mine]}, {self.partner: [self._kept]})
            return out
        theirs = torch.empty_like(self._kept)
        self.world.exchange(step, {self.partner: [self._kept]}, {self.partner: [theirs]})
        return _output(theirs, return_dict)


def _output(sample: torch.Tensor, return_dict: bool) -> Any:
    """What a diffusers transformer returns for `sample` (FLUX's pipeline asks for return_dict=False)."""
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
