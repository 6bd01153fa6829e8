"""`simulate`: asynchronous denoising computed in one process, by definition (docs/strategies.md).

For each compute round the whole denoiser runs once per rank view: the blocks that view's rank owns compute,
every other listed block replays its owner's output from the previous round, and replicated code (everything
not listed) computes fresh from whatever it is given. Nothing here uses the tracer or the runtime, so a data-flow
edge the tracer misses, or a schedule the runtime gets wrong, cannot pass both sides of a comparison.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..compiler.plan import Plan
from ..models.controlnet import controlnet_mode
from ..models.denoiser import check_scheduler, find_denoiser

__all__ = ["simulate"]


# ---- this definition's own small helpers: nothing below is shared with the runtime, so a bug in the runtime's
# τ substitution, timestep bookkeeping or output handling cannot pass both sides of a comparison.
def _copy(output: Any) -> tuple[list[Any], Any]:
    leaves, spec = pytree.tree_flatten(output)
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec


def _replay(stored: tuple[list[Any], Any]) -> Any:
    leaves, spec = stored
    return pytree.tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _eps(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_eps(output: Any, eps: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return eps
    if isinstance(output, (tuple, list)):
        return type(output)([eps, *output[1:]])
    output[next(iter(output.keys()))] = eps
    return output


class _Timestep:
    """Where the timestep is in a call, and τ put there as the pipeline put τ[0]: the pipeline's own scale (τ/1000
    for FLUX), measured here from the first call, with the dtype and shape it passed."""

    def __init__(self, forward: Any):
        self.signature = inspect.signature(forward)
        self.scale: float | None = None

    def measure(self, args: tuple, kwargs: dict, tau0: float) -> None:
        """At the loop's first call, which passes τ[0]."""
        passed = self.signature.bind(*args, **kwargs).arguments["timestep"]
        first = float(passed.reshape(-1)[0]) if isinstance(passed, torch.Tensor) else float(passed)
        self.scale = first / tau0 if tau0 else 1.0

    def call_with(self, args: tuple, kwargs: dict, tau: torch.Tensor) -> tuple[tuple, dict]:
        bound = self.signature.bind(*args, **kwargs)
        passed = bound.arguments["timestep"]
        if isinstance(passed, torch.Tensor):
            value = (tau.to(torch.float64) * self.scale).to(device=passed.device, dtype=passed.dtype)
            new = value.expand(passed.shape)
        else:
            new = type(passed)(float(tau) * self.scale)
        arguments = dict(bound.arguments, timestep=new)
        rebound = inspect.BoundArguments(bound.signature, arguments)  # type: ignore[arg-type]
        return rebound.args, rebound.kwargs


class _Simulation:
    def __init__(
        self, plan: Plan, stride: int, warm_up: int, time_shift: bool, stride_eps: str, num_inference_steps: Any
    ):
        self.requested_warm_up, self.num_inference_steps = warm_up, num_inference_steps
        self.plan, self.stride, self.warm_up, self.time_shift, self.stride_eps = (
            plan,
            stride,
            warm_up,
            time_shift,
            stride_eps,
        )
        self.n = plan.model_n
        self.k = 0
        self.tau: torch.Tensor | None = None
        self.previous: dict[str, tuple] = {}  # block -> its owner's output in the previous round
        self.current: dict[str, tuple] = {}  # block -> output recorded in this round
        self.computing: set[str] | None = None  # None: every block computes (exact step)
        self.record: bool = True
        self.pending_eps: torch.Tensor | None = None  # stride 2: ε of the pair's second step
        self.template: Any = None

    # the view ranks: stride 1 -> rank r owns segment r; stride 2 -> rank n owns segment n-1 as well
    def segment_of_rank(self, rank: int) -> int:
        return min(rank, self.n - 1)

    def block_forward(self, name: str, original):
        def forward(*args, **kwargs):
            if self.computing is None or name in self.computing:
                out = original(*args, **kwargs)
                if self.record:
                    self.current[name] = _copy(out)
                return out
            return _replay(self.previous[name])

        return forward

    def denoiser_forward(self, original, timestep: _Timestep, scheduler):
        def forward(*args, **kwargs):
            k = self.k
            self.k += 1
            if k == 0:
                self.tau = scheduler.timesteps[getattr(scheduler, "begin_index", None) or 0 :]
                self.warm_up = self.requested_warm_up
                if isinstance(self.num_inference_steps, int) and self.warm_up >= self.num_inference_steps:
                    self.warm_up = max(self.warm_up, len(self.tau))  # exact: every call (PNDM calls one more)
                timestep.measure(args, kwargs, float(self.tau[0]))
            if k < self.warm_up:
                self.computing, self.record, self.current = None, True, {}
                out = original(*args, **kwargs)
                self.previous = self.current
                return out
            if self.stride == 2 and self.pending_eps is not None:
                eps, self.pending_eps = self.pending_eps, None
                return _with_eps(self.template, eps)
            shift = 1 if self.time_shift else 0
            K = len(self.tau)
            if self.stride == 1:
                ranks = [(r, k - shift) for r in range(self.n)]
                eps_rank = self.n - 1
            else:
                paired = k + 1 < K
                hi = k + 1 - shift if paired else k - shift
                ranks = [(r, hi) for r in range(self.n)] + [(self.n, k - shift)]
                eps_rank = self.n
            self.current = {}
            outs: dict[int, Any] = {}
            for rank, t_index in ranks:
                self.computing = set(self.plan.segments[self.segment_of_rank(rank)].blocks)
                self.record = rank < self.n  # stride 2: rank n's work serves ε only
                a, kw = timestep.call_with(args, kwargs, self.tau[t_index])
                outs[rank] = original(*a, **kw)
            self.previous = self.current
            self.computing, self.record = None, True
            out = outs[eps_rank]
            if self.stride == 2 and k + 1 < K:
                source = outs[eps_rank] if self.stride_eps == "reuse" else outs[self.n - 1]
                self.pending_eps = _eps(source).clone()
                self.template = outs[self.n - 1]  # an output structure to carry ε_{k+1}
            return out

        return forward


@contextmanager
def _overridden(modules: dict[str, torch.nn.Module], forwards: dict[str, Any]):
    saved = {name: modules[name].__dict__.get("forward") for name in forwards}
    try:
        for name, fn in forwards.items():
            modules[name].forward = fn
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                modules[name].__dict__.pop("forward", None)
            else:
                modules[name].forward = old


def simulate(
    pipe: Any,
    *args: Any,
    plan: Any = None,
    model_n: int | None = None,
    stride: int = 1,
    warm_up: int = 1,
    time_shift: bool = False,
    stride_eps: str = "reuse",
    controlnet: str = "auto",
    **call_kwargs: Any,
) -> Any:
    """Run `pipe(*args, **call_kwargs)` in this process with the asynchronous semantics of docs/strategies.md.

    `plan` is an explicit partition (list of segments of module names, a saved plan, or a Plan); without one,
    `asyncdiff_rt.plan_for` picks one for `model_n`. `controlnet` as AsyncDiff's. Returns what the pipeline
    returns. Use it to preview the fidelity of a configuration before launching it on several GPUs, and as the
    reference in tests.
    """
    if getattr(type(pipe), "_asyncdiff_rt_hooked", False):
        raise ValueError("this pipeline has an AsyncDiff attached: call ad.remove() before simulating it")
    with controlnet_mode(pipe, controlnet):
        return _simulate(pipe, args, plan, model_n, stride, warm_up, time_shift, stride_eps, call_kwargs)


def _simulate(pipe, args, plan, model_n, stride, warm_up, time_shift, stride_eps, call_kwargs) -> Any:
    _, denoiser = find_denoiser(pipe)
    check_scheduler(pipe.scheduler)
    if plan is None:
        if model_n is None:
            raise ValueError("simulate needs plan= or model_n=")
        from ..compiler.planning import plan_for

        plan = plan_for(pipe, model_n)
    plan = Plan.from_spec(plan)
    plan.validate(denoiser)
    if model_n is not None and model_n != plan.model_n:
        raise ValueError(f"model_n={model_n} but the plan has {plan.model_n} segments")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if warm_up < 1:
        raise ValueError(f"warm_up must be >= 1, got {warm_up}")
    if stride_eps not in ("reuse", "fresh"):
        raise ValueError(f"stride_eps must be 'reuse' or 'fresh', got {stride_eps!r}")

    steps = call_kwargs.get("num_inference_steps")
    if steps is None:
        param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
        steps = param.default if param is not None else None
    sim = _Simulation(plan, stride, warm_up, time_shift, stride_eps, steps)
    modules = dict(denoiser.named_modules())
    forwards = {name: sim.block_forward(name, modules[name].forward) for name in plan.blocks}
    forwards[""] = sim.denoiser_forward(
        denoiser.forward, _Timestep(type(denoiser).forward.__get__(denoiser)), pipe.scheduler
    )
    with _overridden(modules, forwards), torch.no_grad():
        return pipe(*args, **call_kwargs)
