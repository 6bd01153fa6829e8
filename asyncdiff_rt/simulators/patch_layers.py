"""What each layer computes inside one patch view of the displaced-patch simulator (docs/strategies.md).

A view holds its own rows of every feature map. Three kinds of layer need other patches' data; each goes
through `PatchExchange.exchange`, which hands back every view's published value of that exchange point:
step k (fresh, in lockstep behind a barrier) or step k-1 (stale; for `no_sync`, frozen at step W-1).

- convolution with kernel height > 1: halo rows from the neighbours' inputs to the same convolution;
- GroupNorm: per-group moments E[x], E[x^2], combined by the sync mode;
- self-attention: keys/values over all patches' tokens in row order, own tokens fresh.

`conv_in` reads the full latent and keeps its own output rows (exact, nothing exchanged).
See "Note [step of an exchanged value]" in `PatchExchange`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

SYNC_MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync", "naive")

# A view that waits this long at an exchange point means the views took different paths: fail, never hang.
BARRIER_TIMEOUT_S = 300.0


class PatchExchange:
    """State shared by the P views of one `simulate_patch` call.

    Note [step of an exchanged value]: `current` collects what the views publish during denoiser call k,
    `previous` holds what they published during call k-1. Fresh reads (warm-up, `full_sync`, and GroupNorm
    under `sync_gn`) wait on a barrier until every view has published step k; stale reads take `previous`,
    complete before step k starts, so they need no synchronisation. `no_sync` stops swapping after step W-1.
    """

    def __init__(self, patches: int, warm_up: int, sync_mode: str):
        self.patches, self.warm_up, self.sync_mode = patches, warm_up, sync_mode
        self.step = 0
        self.current: dict[tuple, list] = {}
        self.previous: dict[tuple, list] = {}
        self.barrier = threading.Barrier(patches, timeout=BARRIER_TIMEOUT_S)
        self._local = threading.local()

    # ---- which view this thread is ------------------------------------------------------------------------

    def enter_view(self, p: int) -> None:
        self._local.view, self._local.calls = p, {}

    def leave_view(self) -> None:
        self._local.view = None

    def view(self) -> int | None:
        return getattr(self._local, "view", None)

    def end_step(self) -> None:
        if not (self.sync_mode == "no_sync" and self.step >= self.warm_up):
            self.previous = self.current
        self.current = {}
        self.step += 1

    # ---- the sync-mode policy -------------------------------------------------------------------------------

    def exact_step(self) -> bool:
        return self.sync_mode != "naive" and (self.step < self.warm_up or self.sync_mode == "full_sync")

    def halo_source(self) -> str:
        """Where halos and other patches' K/V come from now: "none", "fresh" or "stale"."""
        if self.sync_mode == "naive":
            return "none"
        return "fresh" if self.exact_step() else "stale"

    def norm_rule(self) -> str:
        """How GroupNorm combines moments now: "exact", "own", "corrected" or "stale"."""
        if self.exact_step() or self.sync_mode == "sync_gn":
            return "exact"
        if self.sync_mode in ("separate_gn", "no_sync", "naive"):
            return "own"
        return "corrected" if self.sync_mode == "corrected_async_gn" else "stale"

    # ---- the exchange -----------------------------------------------------------------------------------------

    def exchange(self, name: str, value: Any, fresh: bool) -> list:
        """Publish this view's `value` at exchange point `name`; return every view's value there, of step k
        when `fresh`, else of the previous step (index p holds this view's own earlier value)."""
        p = self.view()
        calls = self._local.calls
        key = (name, calls.get(name, 0))  # a module called twice per forward is two exchange points
        calls[name] = key[1] + 1
        self.current.setdefault(key, [None] * self.patches)[p] = value
        if fresh:
            self.barrier.wait()
            return self.current[key]
        if key not in self.previous:
            raise RuntimeError(f"patch simulator: {name} has no value from the previous step (control flow changed)")
        values = self.previous[key]
        if _shapes(values[p]) != _shapes(value):
            raise RuntimeError(f"patch simulator: the input of {name} changed shape between steps")
        return values


def _shapes(value) -> list:
    return [t.shape for t in value] if isinstance(value, tuple) else [value.shape]


# ---- conv_in ----------------------------------------------------------------------------------------------------


def conv_in_forward(ex: PatchExchange, module: torch.nn.Conv2d, original, x: torch.Tensor) -> torch.Tensor:
    p = ex.view()
    if p is None:
        return original(x)
    rows = x.shape[-2] // ex.patches
    if ex.sync_mode == "naive":  # a separate image per patch: zero padding at its borders
        return original(x[..., p * rows : (p + 1) * rows, :])
    out = original(x)
    out_rows = out.shape[-2] // ex.patches
    return out[..., p * out_rows : (p + 1) * out_rows, :].contiguous()


# ---- convolutions with a vertical halo ------------------------------------------------------------------------


def conv_forward(ex: PatchExchange, name: str, module: torch.nn.Conv2d, original, x: torch.Tensor) -> torch.Tensor:
    p = ex.view()
    source = ex.halo_source() if p is not None else "none"
    if source == "none":
        return original(x)
    pad_h, pad_w = module.padding
    if x.shape[-2] < pad_h:
        raise RuntimeError(f"patch simulator: {name} needs {pad_h} halo rows but a patch has {x.shape[-2]}")
    # Publish the rows the neighbours need: our top rows go up, our bottom rows go down.
    edges = (x[..., :pad_h, :].clone(), x[..., x.shape[-2] - pad_h :, :].clone())
    values = ex.exchange(name, edges, fresh=source == "fresh")
    zeros = x.new_zeros(edges[0].shape)  # the image border
    above = values[p - 1][1] if p > 0 else zeros
    below = values[p + 1][0] if p < ex.patches - 1 else zeros
    padded = torch.cat([above, x, below], dim=-2)
    return F.conv2d(padded, module.weight, module.bias, module.stride, (0, pad_w), module.dilation, module.groups)


# ---- GroupNorm ----------------------------------------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    # Moments of half-precision inputs in float32, as torch's GroupNorm accumulates; float64 stays float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = _wide(x.reshape(x.shape[0], groups, -1))
    return flat.mean(-1), flat.square().mean(-1)


def group_norm_forward(
    ex: PatchExchange, name: str, module: torch.nn.GroupNorm, original, x: torch.Tensor
) -> torch.Tensor:
    p = ex.view()
    rule = ex.norm_rule() if p is not None else "own"
    if rule == "own":
        return original(x)
    own = _moments(x, module.num_groups)
    values = ex.exchange(name, own, fresh=rule == "exact")
    if rule == "exact":  # equal patch sizes: the mean of the patches' moments is the image's
        mean = sum(v[0] for v in values) / ex.patches
        sq = sum(v[1] for v in values) / ex.patches
    else:
        if rule == "corrected":  # last step's image moments, moved by how much our own patch moved (the move
            # first: it is small, and summed last it keeps its digits in float32)
            base = [sum(v[i] for v in values) / ex.patches + (own[i] - values[p][i]) for i in (0, 1)]
        else:  # stale: own fresh, others of step k-1
            base = [(own[i] + sum(v[i] for q, v in enumerate(values) if q != p)) / ex.patches for i in (0, 1)]
        mean, sq = base
    var = sq - mean.square()
    if rule == "exact":
        var = var.clamp_min(0)  # only rounding makes it negative (E[x^2] - E[x]^2 of near-constant groups)
    else:  # own patch's fresh variance, two-pass so that it cannot round below zero
        own_var = _wide(x.reshape(x.shape[0], module.num_groups, -1)).var(-1, unbiased=False)
        var = torch.where(var < 0, own_var, var)
    return _normalise(x, module, mean, var)


def _normalise(x: torch.Tensor, module: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    b, g = x.shape[0], module.num_groups
    flat = _wide(x.reshape(b, g, -1))
    y = ((flat - mean[..., None]) * torch.rsqrt(var[..., None] + module.eps)).reshape(x.shape)
    if module.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * _wide(module.weight).reshape(shape) + _wide(module.bias).reshape(shape)
    return y.to(x.dtype)


# ---- self-attention ---------------------------------------------------------------------------------------------


def attention_forward(
    ex: PatchExchange,
    name: str,
    module,
    original,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    p = ex.view()
    source = ex.halo_source() if p is not None else "none"
    if encoder_hidden_states is not None or source == "none":  # cross-attention is local; naive is own rows
        return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    unsupported = [a for a in ("group_norm", "spatial_norm", "norm_cross") if getattr(module, a, None) is not None]
    if hidden_states.dim() != 3 or attention_mask is not None or unsupported:
        raise NotImplementedError(
            f"patch simulator: self-attention {name} needs 3-D tokens without a mask, group_norm, spatial_norm"
            f" or norm_cross (got {hidden_states.dim()}-D, mask={attention_mask is not None}, {unsupported})"
        )
    values = ex.exchange(name, hidden_states.clone(), fresh=source == "fresh")
    # Keys/values are linear per token, so the tokens' K/V equal the K/V of the exchanged tokens.
    tokens = torch.cat([hidden_states if q == p else v for q, v in enumerate(values)], dim=1)
    return original(hidden_states, tokens, None, **kwargs)
