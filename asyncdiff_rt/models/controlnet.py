"""ControlNet listed as blocks (docs/architecture.md): the ControlNet and the UNet driven as one denoiser.

With ``controlnet="replicated"`` a ControlNet pipeline runs its ControlNet in full on every rank, and its
residuals are fresh inputs of the UNet. With ``controlnet="blocks"`` (what "auto", the default, picks for one
ControlNetModel: see AUTO_MODE) the ControlNet's blocks join the partition: they are cut into segments with the
UNet's and follow the stale rule like any block, so no rank pays the whole ControlNet each step
(benchmarks/controlnet_cost.py measures which costs less).

How, without forking diffusers: the pipeline still calls ``pipe.controlnet(...)`` and then ``pipe.unet(...)`` each
step. While installed,
- ``pipe.controlnet``'s forward only records its arguments and returns zero placeholders of batch size (the
  pipeline may concatenate zeros in front of them: guess mode with CFG),
- ``pipe.unet``'s forward calls the :class:`ControlledUNet` with those arguments, which runs the ControlNet's and
  the UNet's own forwards in one call: the denoiser that ``find_denoiser``, the tracer, the simulator and the
  runtime see. Its timestep drives both, so ``time_shift`` moves the ControlNet's timestep too.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .base import class_forward

__all__ = ["ControlledUNet", "ControlNetAsBlocks", "attach_controlnet", "CONTROLNET_MODES", "AUTO_MODE"]

CONTROLNET_MODES = ("blocks", "replicated")
_ATTR = "_asyncdiff_rt_denoiser"  # where find_denoiser looks first (in the pipeline's __dict__)


class ControlledUNet(nn.Module):
    """ControlNet then UNet as one module: ``forward(sample, timestep, ..., controlnet_inputs=...)``."""

    composite_parts = ("controlnet", "unet")  # blocks.py and trace.meta_twin open these parts

    def __init__(self, controlnet: nn.Module, unet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.unet = unet

    @property
    def config(self) -> Any:  # the pipeline-facing configuration is the UNet's (sample size, channels)
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, controlnet_inputs: dict, **kwargs: Any):
        inputs = dict(controlnet_inputs, timestep=timestep, return_dict=False)
        down, mid = class_forward(self.controlnet)(**inputs)
        passed_down = kwargs.pop("down_block_additional_residuals")
        passed_mid = kwargs.pop("mid_block_additional_residual")
        kwargs["down_block_additional_residuals"] = [_fit(p, r) for p, r in zip(passed_down, down)]
        kwargs["mid_block_additional_residual"] = _fit(passed_mid, mid)
        return class_forward(self.unet)(sample, timestep, *args, **kwargs)

    def adapter(self) -> Any:
        """The composite's adapter: the UNet's, whose example call gains the ControlNet's inputs."""
        from .unet import UNetAdapter

        composite = self

        class ControlledUNetAdapter(UNetAdapter):
            def example_call(self, height, width, batch, dtype, device, pipe=None, **overrides):
                args, kwargs = UNetAdapter(composite.unet).example_call(
                    height, width, batch, dtype, device, pipe, **overrides
                )
                return composite.example_call_from(args, kwargs, height, width)

        return ControlledUNetAdapter(self, family="controlnet+unet")

    def example_call_from(self, args: tuple, kwargs: dict, height: int, width: int) -> tuple[tuple, dict]:
        """The composite's call for planning, from the UNet's example call."""
        sample, timestep = args
        batch = sample.shape[0]
        like = dict(dtype=sample.dtype, device=sample.device)
        channels = self.controlnet.config.get("conditioning_channels", 3)
        inputs = {
            "sample": sample,
            "encoder_hidden_states": kwargs["encoder_hidden_states"],
            "controlnet_cond": torch.randn(batch, channels, height, width, **like),
            "conditioning_scale": 1.0,
            "guess_mode": False,
        }
        if "added_cond_kwargs" in kwargs:
            inputs["added_cond_kwargs"] = kwargs["added_cond_kwargs"]
        down, mid = _placeholders(self.controlnet, sample)
        return args, {
            **kwargs,
            "down_block_additional_residuals": down,
            "mid_block_additional_residual": mid,
            "controlnet_inputs": inputs,
        }


def _fit(passed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The residual in the batch layout the pipeline gave its placeholder: as is, or (guess mode with CFG) behind
    zeros for the unconditional half, as diffusers' ControlNet pipelines do."""
    if passed.shape[0] == residual.shape[0]:
        return residual
    if passed.shape[0] == 2 * residual.shape[0]:
        return torch.cat([torch.zeros_like(residual), residual])
    raise ValueError(
        f"controlnet='blocks': the pipeline turned a ControlNet output of batch {residual.shape[0]} into batch "
        f"{passed.shape[0]}, which asyncdiff_rt cannot reproduce: use controlnet='replicated'"
    )


def _placeholders(controlnet: nn.Module, sample: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    zeros = sample.new_zeros(sample.shape[0], 1, 1, 1)
    return [zeros] * len(controlnet.controlnet_down_blocks), zeros


class ControlNetAsBlocks:
    """Installs the composite on a ControlNet pipeline; ``remove()`` restores the pipeline exactly."""

    def __init__(self, pipe: Any):
        from diffusers import ControlNetModel

        controlnet = getattr(pipe, "controlnet", None)
        unet = getattr(pipe, "unet", None)
        if controlnet is None or unet is None:
            raise ValueError(
                f"controlnet='blocks' needs a ControlNet pipeline (pipe.controlnet and pipe.unet); "
                f"{type(pipe).__name__} has none: leave controlnet at its default"
            )
        if type(controlnet) is not ControlNetModel:
            raise ValueError(
                f"controlnet='blocks' supports one ControlNetModel, not {type(controlnet).__name__} (several "
                "ControlNets, ControlNet-XS/Union): use controlnet='replicated'"
            )
        if _ATTR in pipe.__dict__:
            raise ValueError("this pipeline's ControlNet is already listed as blocks")
        for module in (controlnet, unet):
            if "forward" in module.__dict__:
                raise ValueError(
                    f"{type(module).__name__}.forward is already overridden on this instance (another hook or a "
                    "compiled forward): controlnet='blocks' cannot wrap it"
                )
        self.pipe, self.controlnet, self.unet = pipe, controlnet, unet
        self.denoiser = ControlledUNet(controlnet, unet)
        self._pending: dict | None = None
        signature = inspect.signature(type(controlnet).forward)

        def record(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(controlnet, *args, **kwargs)
            inputs = dict(bound.arguments)
            inputs.pop("self")
            return_dict = inputs.pop("return_dict", True)
            inputs.pop("timestep")  # the composite passes its own (time_shift substitutes it)
            self._pending = inputs
            down, mid = _placeholders(controlnet, inputs["sample"])
            if return_dict:
                from diffusers.models.controlnets.controlnet import ControlNetOutput

                return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)
            return tuple(down), mid

        def redirect(*args: Any, **kwargs: Any) -> Any:
            if self._pending is None:
                raise RuntimeError(
                    "controlnet='blocks': the pipeline called the UNet without calling the ControlNet first in this "
                    "step; use controlnet='replicated' for this pipeline"
                )
            inputs, self._pending = self._pending, None
            return self.denoiser(*args, controlnet_inputs=inputs, **kwargs)

        controlnet.forward = record
        unet.forward = redirect
        pipe.__dict__[_ATTR] = self.denoiser

    def remove(self) -> None:
        if self.pipe is None:
            return
        self.controlnet.__dict__.pop("forward", None)
        self.unet.__dict__.pop("forward", None)
        self.pipe.__dict__.pop(_ATTR, None)
        self.pipe = None


def installed_denoiser(pipe: Any) -> nn.Module | None:
    """The composite installed on ``pipe``, if any (denoiser.find_denoiser looks here first)."""
    return getattr(pipe, "__dict__", {}).get(_ATTR)


# What "auto" means for one ControlNetModel. Measured at SDXL-1024, batch 2, fp16 on an H100
# (benchmarks/results/controlnet_sdxl_*.md): the slowest rank's compute per step is 32.8 ms listed as blocks
# against 43.1 ms replicated at n=2 (17.1 against 32.5 at n=4; one GPU: 64.4), for 241 against 134 MB exchanged.
AUTO_MODE = "blocks"


def attach_controlnet(pipe: Any, mode: str, error: type[Exception] = ValueError) -> ControlNetAsBlocks | None:
    """Apply ``controlnet=mode`` to ``pipe``: the installed composite for "blocks", None when the ControlNet stays
    replicated (or the pipeline has none). "auto": ``AUTO_MODE`` for one ControlNetModel, else replicated."""
    if mode not in ("auto", *CONTROLNET_MODES):
        raise error(f"controlnet must be 'auto', 'blocks' or 'replicated'; got {mode!r}")
    if mode == "replicated":
        return None
    if mode == "auto":
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is None or installed_denoiser(pipe) is not None:
            return None
        from diffusers import ControlNetModel

        if type(controlnet) is not ControlNetModel or AUTO_MODE != "blocks":
            return None
    try:
        return ControlNetAsBlocks(pipe)
    except ValueError as err:
        raise error(str(err)) from err


@contextmanager
def controlnet_mode(pipe: Any, mode: str):
    """``attach_controlnet`` for the length of a ``with`` block (plan_for, simulate)."""
    composite = attach_controlnet(pipe, mode)
    try:
        yield
    finally:
        if composite is not None:
            composite.remove()
