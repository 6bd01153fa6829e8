"""What PatchParallel refuses before any work (DESIGN §6, §10): denoisers and layers it cannot split into row
patches, and heights whose latent rows do not split into P x 2^downsamplings."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError

__all__ = ["check_denoiser", "check_controlnet", "full_input_convs", "row_factor", "check_rows", "self_attentions"]

_VIDEO_DENOISERS = ("UNetSpatioTemporalConditionModel", "UNetMotionModel", "UNet3DConditionModel", "I2VGenXLUNet")
_ATTENTION_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")  # what our self-attention reproduces


def check_denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's UNet, if every layer of it can be split into row patches; else a ConfigError naming why."""
    if isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise ConfigError(
            f"PatchParallel splits UNet pipelines into row patches; {type(pipe).__name__} has a transformer "
            f"({type(pipe.transformer).__name__}), whose patch split is not implemented: use asyncdiff_rt.AsyncDiff"
        )
    denoiser = getattr(pipe, "unet", None)
    if not isinstance(denoiser, torch.nn.Module):
        raise ConfigError(f"{type(pipe).__name__} has no `unet` denoiser for PatchParallel to split into patches")
    kind = type(denoiser).__name__
    if kind in _VIDEO_DENOISERS:
        raise ConfigError(
            f"PatchParallel does not split video denoisers ({kind}): their frames fold into the batch and temporal "
            "layers mix them; use asyncdiff_rt.AsyncDiff (segments)"
        )
    conv_in = getattr(denoiser, "conv_in", None)
    if not isinstance(conv_in, torch.nn.Conv2d):
        raise ConfigError(f"{kind} has no `conv_in` Conv2d (the first convolution) for PatchParallel to split after")
    _check_layers(denoiser, "")
    return denoiser


def check_controlnet(pipe: Any, cfg_parallel: bool) -> torch.nn.Module | None:
    """The pipeline's ControlNet, split into the same row patches as the UNet (its residuals add to the UNet's
    rows); None without one. Several ControlNets, and a ControlNet with cfg_parallel, are refused."""
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, torch.nn.Module):
        return None
    kind = type(controlnet).__name__
    if kind != "ControlNetModel" or getattr(controlnet, "controlnet_cond_embedding", None) is None:
        raise ConfigError(
            f"PatchParallel splits one ControlNetModel into row patches, not a {kind}: pass a single ControlNet, "
            "or use asyncdiff_rt.AsyncDiff"
        )
    if cfg_parallel:
        raise ConfigError(
            "PatchParallel(cfg_parallel=True) does not split a ControlNet pipeline's guidance halves yet (the "
            "pipeline calls the ControlNet apart from the UNet): leave cfg_parallel=False"
        )
    _check_layers(controlnet, "controlnet.")
    return controlnet


def full_input_convs(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The convolutions that read the full-height input every rank holds and keep their own output rows: the
    UNet's and the ControlNet's `conv_in`, and the first convolution of the ControlNet's image embedding."""
    embedding = getattr(module, "controlnet_cond_embedding", None)
    return [module.conv_in] + ([embedding.conv_in] if embedding is not None else [])


def _check_layers(model: torch.nn.Module, prefix: str) -> None:
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ConfigError("the denoiser has accelerate offload hooks: load the pipeline without offloading")
    full = {id(c) for c in full_input_convs(model)}
    for name, module in model.named_modules():
        name = prefix + name
        if isinstance(module, torch.nn.Conv2d) and id(module) not in full:
            _check_conv(name, module)
        elif isinstance(module, torch.nn.GroupNorm):
            continue
        elif "GroupNorm" in type(module).__name__ or type(module).__name__ == "SpatialNorm":
            raise ConfigError(f"PatchParallel cannot split {name} ({type(module).__name__}) across patches")
        elif isinstance(module, (torch.nn.Conv3d, torch.nn.Conv1d)):
            raise ConfigError(f"PatchParallel cannot split {name} ({type(module).__name__}) into row patches")
    for name, attn in self_attentions(model):
        _check_attention(prefix + name, attn)


def _check_conv(name: str, conv: torch.nn.Conv2d) -> None:
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if kernel == 1 and stride == 1:
        return  # reads only its own rows
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ConfigError(
            f"PatchParallel needs numeric zero padding on convolution {name} "
            f"(padding={conv.padding!r}, padding_mode={conv.padding_mode!r})"
        )
    pad, span = conv.padding[0], dilation * (kernel - 1) + 1
    # The halo is the conv's own vertical padding: it must map rows n to n / stride ("same" padding).
    if (2 * pad - span) // stride != -1:
        glue = ": its input rows are padded by the glue (F.pad), which the patches cannot split" if pad == 0 else ""
        raise ConfigError(
            f"PatchParallel cannot split convolution {name}: kernel height {kernel}, stride {stride}, vertical "
            f"padding {pad} does not map rows n to n/{stride}{glue}"
        )


def self_attentions(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [
        (n, m) for n, m in denoiser.named_modules() if isinstance(m, Attention) and not m.is_cross_attention
    ]  # fmt: skip


def _check_attention(name: str, attn: Any) -> None:
    processor = type(attn.processor).__name__
    extras = [a for a in ("group_norm", "spatial_norm", "norm_q", "norm_k") if getattr(attn, a, None) is not None]
    if processor not in _ATTENTION_PROCESSORS or extras:
        raise ConfigError(
            f"PatchParallel cannot split self-attention {name}: it handles diffusers' default processor without "
            f"group_norm, spatial_norm or q/k norms (this one: {processor}{', ' + ', '.join(extras) if extras else ''})"
        )


def row_factor(denoiser: torch.nn.Module) -> int:
    """2^(number of downsamplings): the product of the vertical strides of every conv and pooling layer."""
    factor = 1
    for module in denoiser.modules():
        if isinstance(module, torch.nn.Conv2d):
            factor *= module.stride[0]
        elif isinstance(module, (torch.nn.AvgPool2d, torch.nn.MaxPool2d)):
            factor *= module.stride if isinstance(module.stride, int) else module.stride[0]
    return factor


def check_rows(rows: int, patches: int, factor: int, what: str, scale: int = 1) -> None:
    """Latent `rows` must split into `patches` equal patches at every resolution of the UNet."""
    if rows % (patches * factor):
        step = patches * factor * scale
        raise ConfigError(
            f"{what} does not split into {patches} patches: latent rows must be divisible by patches x "
            f"2^downsamplings = {patches} x {factor} = {patches * factor}; use a height that is a multiple of "
            f"{step}" + (" pixels" if scale > 1 else " latent rows")
        )
