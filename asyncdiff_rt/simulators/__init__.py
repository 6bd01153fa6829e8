"""The simulators: each strategy's semantics computed in one process, by definition (docs/strategies.md), sharing
no code with the runtime, so that distributed runs can be compared with them.

`simulate(pipe, strategy="segments", ...)` is asynchronous denoising (simulators/segments.py);
`simulate(pipe, strategy="patch", patches=P, warm_up=, sync_mode=...)` displaced patch parallelism
(simulators/patch.py). `cfg_parallel=True` is accepted by both and changes nothing: CFG parallelism splits the
guidance batch whose halves never interact inside the denoiser, so its definition is the run without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STRATEGIES", "simulate"]

STRATEGIES = ("segments", "patch")


def simulate(pipe: Any, *args: Any, strategy: str = "segments", cfg_parallel: bool = False, **kwargs: Any) -> Any:
    """Run `pipe(*args, **call_kwargs)` in this process with the semantics of `strategy`; returns what the
    pipeline returns. Segments: `plan=` or `model_n=`, `stride`, `warm_up`, `time_shift`, `stride_eps`,
    `controlnet` as AsyncDiff's. Patch: `patches`, `warm_up`, `sync_mode` as PatchParallel's."""
    if not isinstance(cfg_parallel, bool):
        raise ValueError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")
    if strategy == "segments":
        from .segments import simulate as simulate_segments

        return simulate_segments(pipe, *args, **kwargs)
    if strategy == "patch":
        from .patch import simulate_patch

        return simulate_patch(pipe, *args, **kwargs)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
