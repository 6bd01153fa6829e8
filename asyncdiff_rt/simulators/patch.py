"""`simulate_patch`: displaced patch parallelism (DistriFusion) computed in one process, by definition.

Each denoiser call runs the denoiser's own forward P times, once per patch view, in P threads: view p holds
rows [pH/P, (p+1)H/P) of every feature map. Instance-level forward overrides on `conv_in`, the other
convolutions with kernel height > 1, every `nn.GroupNorm` and diffusers' `Attention` make each view exchange
what §10 says through `PatchExchange` (see patch_layers.py); a barrier keeps the views in lockstep where a
mode needs step-k values of other patches. The views' output rows are gathered after every call, so the
pipeline's scheduler sees one ε. Shares no code with the runtime, so it can serve as its reference.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch.utils import _pytree as pytree

from .patch_layers import (
    SYNC_MODES,
    PatchExchange,
    attention_forward,
    conv_forward,
    conv_in_forward,
    group_norm_forward,
)

__all__ = ["SYNC_MODES", "simulate_patch"]

_VIDEO_DENOISERS = ("UNetSpatioTemporalConditionModel", "UNetMotionModel")
_UNSUPPORTED_NORMS = ("AdaGroupNorm", "SpatialNorm")  # group norms that are not nn.GroupNorm


def simulate_patch(
    pipe, *args, patches: int, warm_up: int = 5, sync_mode: str = "corrected_async_gn", **call_kwargs
) -> Any:
    """Run ``pipe(*args, **call_kwargs)`` with displaced patch parallelism over ``patches`` row patches.

    Steps k < ``warm_up`` are exact; later steps follow ``sync_mode`` (one of `SYNC_MODES`,
    docs/strategies.md).
    Returns what the pipeline returns. Bad input raises ValueError before the pipeline runs; a latent height
    that the patches cannot split is refused at the first denoiser call, before any of it computes.
    """
    denoiser = _check_arguments(pipe, patches, warm_up, sync_mode)
    factor = _row_factor(denoiser)
    height = call_kwargs.get("height")
    scale = getattr(pipe, "vae_scale_factor", None)
    if height is not None and scale:
        _check_rows(height // scale, patches, factor, f"height {height} (latent rows {height // scale})", scale)
    ex = PatchExchange(patches, warm_up, sync_mode)
    controlnet = getattr(pipe, "controlnet", None)
    with _installed(denoiser, controlnet if isinstance(controlnet, torch.nn.Module) else None, ex, factor):
        return pipe(*args, **call_kwargs)


# ---- validation ---------------------------------------------------------------------------------------------------


def _check_arguments(pipe, patches, warm_up, sync_mode) -> torch.nn.Module:
    if sync_mode not in SYNC_MODES:
        raise ValueError(f"unknown sync_mode {sync_mode!r}; choose one of {', '.join(SYNC_MODES)}")
    if not isinstance(patches, int) or isinstance(patches, bool) or patches < 1:
        raise ValueError(f"patches must be an integer >= 1, got {patches!r}")
    if not isinstance(warm_up, int) or isinstance(warm_up, bool) or warm_up < 1:
        raise ValueError(f"warm_up must be an integer >= 1 (warm_up >= steps runs exact), got {warm_up!r}")
    if getattr(pipe, "transformer", None) is not None:
        raise ValueError(f"patch simulation supports UNet pipelines; {type(pipe).__name__} has a transformer")
    denoiser = getattr(pipe, "unet", None)
    if not isinstance(denoiser, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no `unet` denoiser to split into patches")
    if type(denoiser).__name__ in _VIDEO_DENOISERS:
        raise ValueError(
            f"patch simulation does not support video denoisers ({type(denoiser).__name__}): their frames fold "
            "into the batch and temporal layers mix them; use the segment strategy (asyncdiff_rt.simulate)"
        )
    conv_in = getattr(denoiser, "conv_in", None)
    if not isinstance(conv_in, torch.nn.Conv2d):
        raise ValueError(f"{type(denoiser).__name__} has no `conv_in` Conv2d, the first convolution")
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, torch.nn.Module) and type(controlnet).__name__ != "ControlNetModel":
        raise ValueError(f"patch simulation splits one ControlNetModel, not a {type(controlnet).__name__}")
    for model in (denoiser, controlnet):
        if not isinstance(model, torch.nn.Module):
            continue
        whole = _whole_input_convs(model)
        for name, module in model.named_modules():
            if type(module).__name__ in _UNSUPPORTED_NORMS:
                raise ValueError(f"patch simulation cannot split {name} ({type(module).__name__}) across patches")
            if isinstance(module, torch.nn.Conv2d) and all(module is not c for c in whole):
                _check_conv(name, module)
    return denoiser


def _whole_input_convs(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Convolutions whose input is the whole image on every view: `conv_in`, and a ControlNet's first
    convolution of its conditioning image."""
    embedding = getattr(model, "controlnet_cond_embedding", None)
    return [model.conv_in] + ([embedding.conv_in] if embedding is not None else [])


def _check_conv(name: str, conv: torch.nn.Conv2d) -> None:
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if kernel == 1 and stride == 1:
        return  # reads only its own rows
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"patch simulation needs numeric zero padding on convolution {name} "
            f"(padding={conv.padding!r}, padding_mode={conv.padding_mode!r})"
        )
    pad, span = conv.padding[0], dilation * (kernel - 1) + 1
    # The halo is the conv's own vertical padding, so it must map rows n -> n / stride ("same" padding).
    if (2 * pad - span) // stride != -1:
        hint = " - its input rows are padded by the glue (F.pad), which the patches cannot split" if pad == 0 else ""
        raise ValueError(
            f"patch simulation cannot split convolution {name}: kernel height {kernel}, stride {stride}, "
            f"vertical padding {pad} does not map rows n to n/{stride}{hint}"
        )


def _row_factor(denoiser: torch.nn.Module) -> int:
    """2^(number of downsamplings): the product of the vertical strides of every conv and pooling layer."""
    pools = (torch.nn.AvgPool2d, torch.nn.MaxPool2d)
    factor = 1
    for module in denoiser.modules():
        if isinstance(module, torch.nn.Conv2d):
            factor *= module.stride[0]
        elif isinstance(module, pools):
            stride = module.stride if isinstance(module.stride, int) else module.stride[0]
            factor *= stride
    return factor


def _check_rows(rows: int, patches: int, factor: int, what: str, scale: int = 1) -> None:
    if rows % (patches * factor):
        step = patches * factor * scale
        raise ValueError(
            f"{what} does not split into {patches} patches: latent rows must be divisible by patches x "
            f"2^downsamplings = {patches} x {factor} = {patches * factor}; use a height that is a multiple "
            f"of {step}" + (" pixels" if scale > 1 else " rows")
        )


# ---- installing the views ---------------------------------------------------------------------------------------


@contextmanager
def _installed(denoiser: torch.nn.Module, controlnet: torch.nn.Module | None, ex: PatchExchange, factor: int):
    """Install the per-view forward overrides on the denoiser, the ControlNet and their layers; restore every one
    on exit. A ControlNet's views run when the pipeline calls it (each computes its own rows, exchanging at its own
    points, named `controlnet.*`); its residuals are handed over whole, and each view of the denoiser takes its
    rows of them."""
    saved: list[tuple[torch.nn.Module, Any]] = []

    def override(module: torch.nn.Module, fn) -> None:
        saved.append((module, module.__dict__.get("forward")))
        module.forward = functools.partial(fn, module.forward)

    try:
        for model, prefix in ((denoiser, ""), (controlnet, "controlnet.")):
            if model is None:
                continue
            whole = _whole_input_convs(model)
            for name, module in model.named_modules():
                name = prefix + name
                if any(module is c for c in whole):
                    override(module, functools.partial(_bind_conv_in, ex, module))
                elif isinstance(module, torch.nn.Conv2d) and (module.kernel_size[0] > 1 or module.stride[0] > 1):
                    override(module, functools.partial(_bind, conv_forward, ex, name, module))
                elif isinstance(module, torch.nn.GroupNorm):
                    override(module, functools.partial(_bind, group_norm_forward, ex, name, module))
                elif isinstance(module, Attention):
                    override(module, functools.partial(_bind, attention_forward, ex, name, module))
        if controlnet is not None:
            override(controlnet, functools.partial(_controlnet_forward, ex))
        override(denoiser, functools.partial(_denoiser_forward, ex, factor))
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _bind(layer_fn, ex, name, module, original, *args, **kwargs):
    return layer_fn(ex, name, module, original, *args, **kwargs)


def _bind_conv_in(ex, module, original, x):
    return conv_in_forward(ex, module, original, x)


def _denoiser_forward(ex: PatchExchange, factor: int, original, *args, **kwargs):
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    if ex.step == 0:
        _check_rows(sample.shape[-2], ex.patches, factor, f"the latent height {sample.shape[-2]}")
    outputs = _run_views(ex, lambda: original(*args, **_own_residual_rows(ex, kwargs)))
    ex.end_step()
    return _gather_rows(outputs)


_RESIDUALS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def _own_residual_rows(ex: PatchExchange, kwargs: dict) -> dict:
    """This view's rows of the ControlNet residuals the pipeline hands the denoiser (whole, as gathered)."""
    p = ex.view()

    def rows(x):
        n = x.shape[-2] // ex.patches
        return x[..., p * n : (p + 1) * n, :]

    return {k: (pytree.tree_map(rows, v) if k in _RESIDUALS and v is not None else v) for k, v in kwargs.items()}


def _controlnet_forward(ex: PatchExchange, original, *args, **kwargs):
    """The ControlNet's views, each computing its rows; its outputs gathered whole, row order, leaf by leaf."""
    outputs = _run_views(ex, lambda: original(*args, **kwargs))
    leaves = [pytree.tree_flatten(o) for o in outputs]
    joined = [torch.cat(parts, dim=-2) for parts in zip(*(lv for lv, _ in leaves))]
    return pytree.tree_unflatten(joined, leaves[0][1])


def _run_views(ex: PatchExchange, call) -> list:
    """Run `call` once per view, views 1..P-1 in threads, view 0 in this thread; re-raise the first error."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    results: list = [None] * ex.patches
    errors: list[BaseException | None] = [None] * ex.patches

    def view(p: int) -> None:
        try:
            # Grad and inference mode are thread-local: carry the pipeline's no_grad into the view threads.
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                ex.enter_view(p)
                results[p] = call()
        except BaseException as error:  # noqa: BLE001 - reported by the calling thread below
            errors[p] = error
            ex.barrier.abort()  # release views waiting for this one
        finally:
            ex.leave_view()

    threads = [threading.Thread(target=view, args=(p,), name=f"patch-view-{p}") for p in range(1, ex.patches)]
    for thread in threads:
        thread.start()
    view(0)
    for thread in threads:
        thread.join()
    failed = [e for e in errors if e is not None]
    if failed:  # the views that only saw the broken barrier are not the news
        raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
    return results


def _gather_rows(outputs: list):
    """The denoiser output with every view's rows concatenated in row order (the H axis, -2)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=-2)
    if isinstance(first, tuple):
        return (torch.cat([o[0] for o in outputs], dim=-2), *first[1:])
    key = next(iter(first.keys()))  # a diffusers BaseOutput: its first field is the sample
    first[key] = torch.cat([o[key] for o in outputs], dim=-2)
    return first
