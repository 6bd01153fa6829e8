"""Per-call checks every strategy runs on the pipeline's loop: the ranks agree on the call, the denoiser is called
once per step in timestep order, the batch stays fixed, and (debug) the latents stay equal on every rank.

Note [no host sync]
    Reading a GPU timestep to check it would stall the host every step (the GPU then idles while Python prepares
    the next one: 3% of an SD1.5 step on an H100), so GPU timesteps are collected during the loop and checked
    once, with one read, before the call returns. The checks at the first step (agreement, digests) read the
    GPU once per call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import ConfigError, DenoiserError
from ..models.denoiser import TimestepArg

__all__ = ["LoopGuard", "digest"]


def _close(passed: float, expected: float, dtype: torch.dtype | None) -> bool:
    """`passed` is τ as the pipeline hands it over: cast to the timestep tensor's dtype (FLUX: bfloat16, whose
    rounding near 1 is 0.4 %), so compare with `expected` cast the same way, within one step of that dtype."""
    tol = 1e-3
    if dtype is not None and dtype.is_floating_point:
        expected = torch.tensor(expected, dtype=torch.float64).to(dtype).item()
        tol = max(tol, torch.finfo(dtype).eps)
    return abs(passed - expected) <= tol * max(1.0, abs(expected))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class LoopGuard:
    """Checks of one pipeline call's denoiser loop; `transport` gathers across ranks (None: one rank)."""

    def __init__(self, transport: Any, debug: bool, timestep_divisor: float):
        self.transport, self.debug, self.divisor = transport, debug, timestep_divisor
        self.tau_host: list[float] = []
        self.batch: int | None = None
        self.call: dict[str, Any] = {}  # the call's own arguments to agree on (steps, guidance)
        self.rank_local: frozenset[str] = frozenset()  # denoiser arguments that differ per rank by design
        self.extra: dict[str, Any] = {}  # more to agree on at the first step (what the strategy saw before it)
        self._passed: list[tuple[int, torch.Tensor]] = []

    def begin_call(self, kwargs: dict, default_steps: Any) -> None:
        self.call = {
            "num_inference_steps": kwargs.get("num_inference_steps", default_steps),
            "guidance_scale": kwargs.get("guidance_scale"),
        }
        self._passed = []

    def begin_loop(self, tau_host: list[float], bound: Any, sample: torch.Tensor) -> None:
        """Step 0: τ known; check the pipeline passes τ as the model adapter says, and that every rank agrees."""
        self.tau_host, self.batch = tau_host, sample.shape[0]
        passed, first = TimestepArg.value(bound), tau_host[0]
        expected = first / self.divisor
        t = bound.arguments["timestep"]
        if not _close(passed, expected, t.dtype if isinstance(t, torch.Tensor) else None):
            raise DenoiserError(
                f"the pipeline passed timestep {passed:g} to the denoiser for the scheduler's τ[0] = {first:g}, not "
                f"{expected:g} (τ / {self.divisor:g}, as its model adapter says): this pipeline transforms the "
                "timestep in a way asyncdiff_rt does not know; please report the pipeline class"
            )
        if self.transport is None:
            return
        others = {
            k: v
            for k, v in bound.arguments.items()
            if k != "timestep"
            and k not in self.rank_local
            and v is not sample
            and any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))
        }
        mine = {
            "the number of steps": (self.call.get("num_inference_steps"), len(tau_host)),
            "the image size (latent shape)": tuple(sample.shape[1:]),
            "the batch": sample.shape[0],
            "the dtype": str(sample.dtype),
            "the prompt (text embeddings and conditions)": {
                k: [digest(x) for x in pytree.tree_leaves(v) if isinstance(x, torch.Tensor)] for k, v in others.items()
            },
            "the guidance scale": self.call.get("guidance_scale"),
            "the starting latents": digest(sample),
            **self.extra,
        }
        everyone = self.transport.all_gather_object(mine, phase="call set-up: agreement on the call's arguments")
        for key in mine:
            values = [e[key] for e in everyone]
            if any(v != values[0] for v in values):
                if key == "the starting latents":
                    raise ConfigError(
                        "ranks start from different latents: pass the same generator seed (or none) on every rank"
                    )
                if key.startswith("the prompt"):
                    shown = ", ".join(f"rank {r}" for r, v in enumerate(values) if v != values[0])
                    raise ConfigError(
                        f"ranks disagree on {key}: {shown} differ from rank 0; every rank must call the pipeline "
                        "with the same arguments"
                    )
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ConfigError(
                    f"ranks disagree on {key} ({per_rank}): every rank must call the pipeline with the same arguments"
                )

    def check_step(self, k: int, bound: Any, sample: torch.Tensor) -> None:
        if k >= len(self.tau_host):
            raise DenoiserError(
                f"the denoiser was called {k + 1} times but the scheduler has {len(self.tau_host)} timesteps: the "
                "pipeline calls it more than once per step, which this strategy cannot schedule"
            )
        t = bound.arguments["timestep"]
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            self._passed.append((k, t.detach().reshape(-1)[0]))  # Note [no host sync]
        else:
            self._check_timestep(k, TimestepArg.value(bound), t.dtype if isinstance(t, torch.Tensor) else None)
        if sample.shape[0] != self.batch:
            raise ConfigError(
                f"step {k}: the batch changed from {self.batch} to {sample.shape[0]} mid-run (a callback that turns "
                "CFG off?); the runtime keeps per-step state of the batch: keep it fixed"
            )
        if self.debug and self.transport is not None:
            digests = self.transport.all_gather_object(digest(sample), phase=f"debug check of step {k}")
            if len(set(digests)) > 1:
                raise RuntimeError(f"debug: latents differ across ranks at step {k}: {digests}")

    def _check_timestep(self, k: int, passed: float, dtype: torch.dtype | None = None) -> None:
        expected = self.tau_host[k] / self.divisor
        if not _close(passed, expected, dtype):
            raise DenoiserError(
                f"step {k}: the denoiser got timestep {passed:g} but the scheduler's τ[{k}] is {expected:g}; the "
                "pipeline calls the denoiser more than once per step or not in timestep order (e.g. Heun/DPM2 "
                "schedulers, skip_guidance_layers), which this strategy cannot schedule"
            )

    def finish(self) -> None:
        """Check the GPU timesteps collected during the loop (Note [no host sync])."""
        passed, self._passed = self._passed, []
        if passed:
            values = torch.stack([t.float() for _, t in passed]).cpu().tolist()
            for (k, t), value in zip(passed, values):
                self._check_timestep(k, value, t.dtype)
