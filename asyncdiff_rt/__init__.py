"""asyncdiff_rt: asynchronous denoising (AsyncDiff) for unchanged diffusers pipelines on several GPUs.

ad = asyncdiff_rt.AsyncDiff(pipe, model_n=4, stride=1, warm_up=3)   # under torchrun, on every rank
image = pipe(prompt).images[0]                                      # rank 0 gets the image
"""

from __future__ import annotations

__version__ = "0.1.0"

from .denoiser import DenoiserError
from .plan import Plan, PlanError, Segment, load_plan
from .runtime import AsyncDiff, ConfigError
from .schedule import Step, make_schedule
from .simulate import simulate
from .transport import TransportError


def plan_for(*args, **kwargs):
    """Measure the denoiser's block costs and partition it; see asyncdiff_rt.planning.plan_for."""
    from .planning import plan_for as _plan_for

    return _plan_for(*args, **kwargs)


__all__ = [
    "AsyncDiff",
    "ConfigError",
    "DenoiserError",
    "Plan",
    "PlanError",
    "Segment",
    "Step",
    "TransportError",
    "load_plan",
    "make_schedule",
    "plan_for",
    "simulate",
    "__version__",
]
