"""The step schedule as plain data: what every rank does at each step of the pipeline's loop (docs/strategies.md).

`make_schedule(K, ...)` returns one `Step` per denoiser call. Print it to see a configuration at a glance:

    k=0 exact          k=1 round τ[1]/r0-1 τ[1]/r2 ε<-r2 ...
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Step", "make_schedule", "roles"]

EXACT, ROUND, REUSE = "exact", "round", "reuse"


@dataclass(frozen=True)
class Step:
    k: int
    kind: str  # EXACT: the whole denoiser, sequentially; ROUND: every rank computes; REUSE: ε from the last round
    t_index: tuple[int, ...] = ()  # per rank: index into τ of the timestep that rank computes with (ROUND)
    eps_rank: int = -1  # whose output is ε_k (ROUND)
    next_eps_rank: int = -1  # stride 2 with stride_eps="fresh": whose output becomes ε_{k+1}; -1: reuse ε_k

    def __str__(self) -> str:
        if self.kind != ROUND:
            return f"k={self.k} {self.kind}"
        ts = ",".join(str(t) for t in self.t_index)
        extra = f" ε_{self.k + 1}<-r{self.next_eps_rank}" if self.next_eps_rank >= 0 else ""
        return f"k={self.k} round τ[{ts}] ε<-r{self.eps_rank}{extra}"


def roles(model_n: int, stride: int) -> list[int]:
    """Segment owned by each rank: rank r < n owns S_r; with stride 2, rank n owns S_{n-1} as well."""
    return list(range(model_n)) + ([model_n - 1] if stride == 2 else [])


def make_schedule(
    num_steps: int, model_n: int, stride: int, warm_up: int, time_shift: bool, stride_eps: str = "reuse"
) -> list[Step]:
    n, shift = model_n, (1 if time_shift else 0)
    world = n + stride - 1
    steps: list[Step] = []
    k = 0
    while k < num_steps:
        if k < warm_up:
            steps.append(Step(k, EXACT))
            k += 1
            continue
        if stride == 1:
            steps.append(Step(k, ROUND, tuple([k - shift] * world), eps_rank=n - 1))
            k += 1
            continue
        paired = k + 1 < num_steps
        hi = (k + 1 if paired else k) - shift
        t_index = tuple([hi] * n + [k - shift])
        fresh = paired and stride_eps == "fresh"
        steps.append(Step(k, ROUND, t_index, eps_rank=n, next_eps_rank=n - 1 if fresh else -1))
        if paired:
            steps.append(Step(k + 1, REUSE))
        k += 2 if paired else 1
    return steps
