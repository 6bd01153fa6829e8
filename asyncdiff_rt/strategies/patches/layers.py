"""What each layer of the denoiser computes on this rank's rows (DESIGN §10), as forward overrides.

Rank p holds rows [pH/P, (p+1)H/P) of every feature map below `conv_in`. Three kinds of layer need other
patches' data, through `PatchExchange.share` (exchange.py): convolutions with a vertical extent (halo rows from
the neighbours' inputs), GroupNorm (per-group moments) and self-attention (keys and values over all rows). The
step's `StepPolicy` (modes.py) says whether those values are fresh, stale or not exchanged at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .exchange import PatchExchange

__all__ = ["halo_rows", "conv_in_forward", "halo_conv_forward", "group_norm_forward", "self_attention_forward"]


def halo_rows(conv: torch.nn.Conv2d, rows: int) -> tuple[int, int]:
    """Rows above and below a patch of `rows` input rows that `conv` reads to make its rows // stride output
    rows: its vertical padding above; below only what the last output row reaches (0 for stride-2 3x3)."""
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    above, span = conv.padding[0], dilation * (kernel - 1) + 1
    below = max(0, (rows // stride - 1) * stride + span - above - rows)
    return above, below


def _conv_rows(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv` on rows that already carry their vertical halo: only the horizontal padding is left to add."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


# ---- conv_in --------------------------------------------------------------------------------------------------------


def conv_in_forward(ex: PatchExchange, conv: torch.nn.Conv2d, original: Callable) -> Callable:
    """`conv_in` reads the full latent every rank holds: its own output rows, exact, nothing exchanged."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        rows = height // ex.world
        start, end = ex.rank * rows, (ex.rank + 1) * rows
        if ex.policy.sync_mode == "naive":  # each patch an image of its own: zero padding at its borders
            return original(x[..., start:end, :])
        above, below = halo_rows(conv, rows)
        lo, hi = max(0, start - above), min(height, end + below)
        padded = F.pad(x[..., lo:hi, :], (0, 0, above - (start - lo), below - (hi - end)))  # zeros at the border
        return _conv_rows(conv, padded)

    return forward


# ---- convolutions with a vertical halo ------------------------------------------------------------------------------


def halo_conv_forward(ex: PatchExchange, name: str, conv: torch.nn.Conv2d, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        source = ex.policy.halo_source
        rows = x.shape[-2]
        above, below = halo_rows(conv, rows)
        if source == "none" or above == below == 0:
            return original(x)
        if rows < max(above, below):
            raise RuntimeError(f"PatchParallel: {name} needs {max(above, below)} halo rows, a patch has {rows}")
        # The patch above needs our top `below` rows (its lower halo); the patch below our bottom `above` rows.
        own = {}
        if below:
            own["top"] = x[..., :below, :]
        if above:
            own["bottom"] = x[..., rows - above :, :]
        _, others = ex.share(ex.point(name), own, fresh=source == "fresh", full_bytes=x.numel() * x.element_size())
        parts = []
        if above:
            up = others["bottom"].get(ex.rank - 1)
            parts.append(up if up is not None else x.new_zeros((*x.shape[:-2], above, x.shape[-1])))
        parts.append(x)
        if below:
            down = others["top"].get(ex.rank + 1)
            parts.append(down if down is not None else x.new_zeros((*x.shape[:-2], below, x.shape[-1])))
        return _conv_rows(conv, torch.cat(parts, dim=-2))

    return forward


# ---- GroupNorm ------------------------------------------------------------------------------------------------------


# Half precision takes fused kernels: the explicit float32 form made ~10 passes over every feature map, the bulk of
# what the exchanged modes cost over no_sync (2048 px SDXL: the corrected_async_gn step at 1.105x the no_sync step,
# 1.026x fused). float32 and float64 keep the explicit form, the simulator's own arithmetic: corrected_async_gn is
# ill-conditioned (var = E[x^2] - E[x]^2 of stale moments, and the fallback below switches at var = 0), so even
# float64 only matches the simulator to 1e-8 where both round alike (H200: 9.5e-7 with Welford moments).
_FUSED = (torch.float16, torch.bfloat16)


def _widened(x: torch.Tensor, groups: int) -> torch.Tensor:
    # Half-precision moments accumulate in float32, as torch's GroupNorm does; float64 stays float64.
    return x.reshape(x.shape[0], groups, -1).to(torch.promote_types(x.dtype, torch.float32))


def _moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This patch's per-group (E[x], E[x^2]) stacked, (2, batch, groups), and, in half precision, its biased
    variance from the same Welford pass (None otherwise: computed where it is needed, `_own_var`)."""
    flat = _widened(x, groups)
    if x.dtype in _FUSED:
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        return torch.stack([mean, var + mean.square()]), var
    return torch.stack([flat.mean(-1), flat.square().mean(-1)]), None


def _own_var(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The patch's own biased variance per group, two-pass (the explicit form's)."""
    return _widened(x, groups).var(-1, unbiased=False)


def _normalise(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per group, in the statistics' precision. Half precision: one
    fused kernel, batch_norm in inference mode over (1, batch x channels) with each group's statistics repeated
    over its channels (it reads the input once and rounds once)."""
    batch, channels = x.shape[0], x.shape[1]
    stat = mean.dtype
    if x.dtype not in _FUSED:
        flat = _widened(x, norm.num_groups).to(stat)
        y = ((flat - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * norm.weight.to(y.dtype).reshape(shape) + norm.bias.to(y.dtype).reshape(shape)
        return y.to(x.dtype)
    per_group = channels // norm.num_groups
    weight = bias = None
    if norm.affine:
        weight, bias = norm.weight.to(stat).repeat(batch), norm.bias.to(stat).repeat(batch)
    y = F.batch_norm(
        x.reshape(1, batch * channels, -1),
        mean.repeat_interleave(per_group, dim=1).reshape(-1),
        var.repeat_interleave(per_group, dim=1).reshape(-1),
        weight,
        bias,
        training=False,
        eps=norm.eps,
    )
    return y.reshape(x.shape)


def group_norm_forward(ex: PatchExchange, name: str, norm: torch.nn.GroupNorm, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        rule = ex.policy.norm_rule
        if rule == "own" or ex.world == 1:
            return original(x)
        own, own_var = _moments(x, norm.num_groups)  # own: (2, batch, groups): E[x], E[x^2]
        then, others = ex.share(
            ex.point(name), {"gn": own}, fresh=rule == "exact", full_bytes=x.numel() * x.element_size()
        )
        own_then, theirs = then["gn"], sum(others["gn"].values())
        if rule == "exact":  # equal patch sizes: the image's moments are the mean of the patches'
            moments = (own + theirs) / ex.world
        elif rule == "corrected":  # last step's image moments, moved by how far our own patch moved since
            moments = (own_then + theirs) / ex.world + (own - own_then)
        else:  # stale: own fresh, the others' of the step before
            moments = (own + theirs) / ex.world
        mean, var = moments[0], moments[1] - moments[0].square()
        if rule == "exact":
            var = var.clamp_min(0)  # negative only by rounding, for near-constant groups
        else:  # a stale combination can come out negative: the own patch's fresh variance then
            var = torch.where(var < 0, own_var if own_var is not None else _own_var(x, norm.num_groups), var)
        return _normalise(x, norm, mean, var)

    return forward


# ---- self-attention -------------------------------------------------------------------------------------------------


def _project_into(linear: Any, x: torch.Tensor, out: torch.Tensor) -> None:
    """out = linear(x) for x and out (batch, tokens, features), out a part of a K/V buffer whose batch rows are
    apart (Note [kv slots] in exchange.py): a plain Linear writes there straight from its GEMMs (one per batch row,
    each a contiguous (tokens, features) output); anything else (LoRA, autocast, autograd: out= has no gradient)
    through one copy."""
    plain = type(linear) is torch.nn.Linear and x.dtype == out.dtype
    if plain and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        weight = linear.weight.t()
        for b in range(x.shape[0]):
            if linear.bias is None:
                torch.mm(x[b], weight, out=out[b])
            else:
                torch.addmm(linear.bias, x[b], weight, out=out[b])
        return
    out.copy_(linear(x))


def self_attention_forward(ex: PatchExchange, name: str, attn: Any, original: Callable) -> Callable:
    """diffusers `Attention` without text states: queries of own tokens, keys/values of every patch's tokens in
    row order (own fresh), read as one buffer (Note [kv slots] in exchange.py). Cross-attention (text keys) is
    local."""

    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        source = ex.policy.halo_source
        if encoder_hidden_states is not None or source == "none" or ex.world == 1:
            return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if hidden_states.dim() != 3 or attention_mask is not None or kwargs:
            raise NotImplementedError(
                f"PatchParallel: self-attention {name} needs 3-D tokens without a mask or extra arguments "
                f"(got {hidden_states.dim()}-D, mask={attention_mask is not None}, {sorted(kwargs)})"
            )
        batch, tokens = hidden_states.shape[:2]
        q = attn.to_q(hidden_states)
        point = ex.point(name)
        whole = ex.kv_buffer(point)  # (2, batch, P, tokens, inner), None at the step that registers the point
        inner = getattr(attn, "inner_kv_dim", q.shape[-1])
        own = whole[:, :, ex.rank] if whole is not None else q.new_empty((2, batch, tokens, inner))
        _project_into(attn.to_k, hidden_states, own[0])  # the same arithmetic at every step
        _project_into(attn.to_v, hidden_states, own[1])
        _, others = ex.share(
            point, {"kv": own}, fresh=source == "fresh", full_bytes=hidden_states.numel() * hidden_states.element_size()
        )
        if whole is None:
            whole = torch.stack([own if p == ex.rank else others["kv"][p] for p in range(ex.world)], dim=2)
        heads = attn.heads
        head_dim = q.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (batch, P, tokens, inner) -> (batch, heads, P x tokens, dim)
            return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            q.reshape(batch, tokens, heads, head_dim).transpose(1, 2), split(whole[0]), split(whole[1]),
            scale=attn.scale,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    return forward
