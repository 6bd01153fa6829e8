"""What the runtime and the simulator need to know about a pipeline's denoiser and its loop, and nothing more:
where the denoiser is, which argument is the timestep, how to rebuild its output with another ε, which
schedulers and options call it more than once per step. No tracing happens here (docs/strategies.md)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import DenoiserError
from .base import class_forward

__all__ = [
    "DenoiserError",
    "find_denoiser",
    "class_forward",
    "check_scheduler",
    "loop_timesteps",
    "TimestepArg",
    "effective_warm_up",
    "first_tensor",
    "replace_first_tensor",
]

DENOISER_ATTRS = ("unet", "transformer")


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    from .controlnet import installed_denoiser

    composite = installed_denoiser(pipe)  # ControlNet listed as blocks: ControlNet + UNet as one denoiser
    if composite is not None:
        return "unet", composite
    for attr in DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            if "timestep" not in inspect.signature(class_forward(module)).parameters:
                raise DenoiserError(
                    f"{type(module).__name__} (pipe.{attr}) has no 'timestep' argument; asyncdiff_rt drives "
                    "denoisers called as denoiser(sample, timestep, ...) once per step"
                )
            return attr, module
    raise DenoiserError(
        f"{type(pipe).__name__} has no denoiser asyncdiff_rt can drive: expected a torch module at pipe.unet or "
        "pipe.transformer (diffusers UNet or DiT pipelines)"
    )


def check_scheduler(scheduler: Any) -> None:
    """Reject schedulers that call the denoiser more than once per step (Heun, DPM2, KDPM2, DPM-SDE)."""
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise DenoiserError(
            f"{type(scheduler).__name__} calls the denoiser {order} times per step (scheduler.order={order}); "
            "asynchronous denoising needs one call per step: use e.g. DPMSolverMultistepScheduler, "
            "EulerDiscreteScheduler or DDIMScheduler (pipe.scheduler = X.from_config(pipe.scheduler.config))"
        )


def loop_timesteps(scheduler: Any) -> torch.Tensor:
    """τ: the scheduler's timesteps from the index of the loop's first denoiser call (docs/strategies.md)."""
    timesteps = scheduler.timesteps
    begin = getattr(scheduler, "begin_index", None) or 0
    return timesteps[begin:]


class TimestepArg:
    """Finds the timestep in a denoiser call and substitutes τ[j] with the shape and dtype the pipeline uses."""

    def __init__(self, forward: Any):
        self.signature = inspect.signature(forward)

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        bound = self.signature.bind(*args, **kwargs)
        if "timestep" not in bound.arguments:
            raise DenoiserError("the pipeline called the denoiser without a timestep")
        return bound

    @staticmethod
    def value(bound: inspect.BoundArguments) -> float:
        t = bound.arguments["timestep"]
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0])
        return float(t)

    @staticmethod
    def substitute(bound: inspect.BoundArguments, new_value: torch.Tensor | float) -> tuple[tuple, dict]:
        """The call with its timestep replaced by `new_value` (already as the pipeline passes it: see the model
        adapter's `timestep_as_passed`)."""
        args = dict(bound.arguments)
        args["timestep"] = new_value
        rebound = inspect.BoundArguments(bound.signature, args)  # type: ignore[arg-type]
        return rebound.args, rebound.kwargs


def effective_warm_up(warm_up: int, num_inference_steps: Any, denoiser_calls: int) -> int:
    """`warm_up >= num_inference_steps` runs the whole loop exactly, also for schedulers that call the
    denoiser more often than `num_inference_steps` (PNDM's PLMS steps: one extra call)."""
    if isinstance(num_inference_steps, int) and warm_up >= num_inference_steps:
        return max(warm_up, denoiser_calls)
    return warm_up


def first_tensor(output: Any) -> torch.Tensor:
    """ε: the denoiser's output tensor (UNet2DConditionOutput.sample, a tuple's first element, a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]  # diffusers BaseOutput is an ordered dict: [0] is its first field


def replace_first_tensor(output: Any, eps: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return eps
    if isinstance(output, tuple):
        return (eps, *output[1:])
    if isinstance(output, list):
        return [eps, *output[1:]]
    key = next(iter(output.keys()))
    setattr(output, key, eps)  # BaseOutput keeps attribute and item in step
    return output
