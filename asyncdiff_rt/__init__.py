"""asyncdiff_rt: asynchronous denoising (AsyncDiff) for unchanged diffusers pipelines on several GPUs.

ad = asyncdiff_rt.AsyncDiff(pipe, model_n=4, stride=1, warm_up=3)   # under torchrun, on every rank
image = pipe(prompt).images[0]                                      # rank 0 gets the image
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compiler.plan import Plan, PlanError, Segment, load_plan
from .models.denoiser import DenoiserError
from .simulators import simulate
from .strategies.patches import PatchParallel
from .strategies.segments.asyncdiff import AsyncDiff, ConfigError
from .strategies.segments.schedule import Step, make_schedule
from .transport import TransportError


def plan_for(*args, **kwargs):
    """Measure the denoiser's block costs and partition it; see asyncdiff_rt.compiler.planning.plan_for."""
    from .compiler.planning import plan_for as _plan_for

    return _plan_for(*args, **kwargs)


__all__ = [
    "AsyncDiff",
    "ConfigError",
    "DenoiserError",
    "PatchParallel",
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
