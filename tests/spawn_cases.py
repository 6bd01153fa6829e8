"""What the strategy test workers share (tests/cfg_cases.py, tests/patch_cases.py): float64 tiny pipelines on the
CPU (fp32 without TF32 on a GPU), the call of a case, its latents, and the parent's one spawn per world size."""

from __future__ import annotations

import os

import torch

DTYPE = torch.float64


def pipe_of(kind: str, device: str = "cpu", dtype: str | None = None):
    """`dtype` (a torch dtype's name) only on a GPU: "float64" there takes rounding out of a comparison."""
    from asyncdiff_rt.tiny import make_pipeline

    if device != "cpu":  # fp32 on a GPU, without TF32 and with fixed cuDNN algorithms
        from dist_cases import exact_gpu_math

        exact_gpu_math()
        return make_pipeline(kind, seed=0, device=device, dtype=getattr(torch, dtype or "float32"))
    return make_pipeline(kind, seed=0, dtype=DTYPE)


def call_kwargs(case: dict, rank: int = 0) -> dict:
    """The case's call: steps, size and device from the case, latent output, and (kill_rank) a rank that exits
    without a word at step 2."""
    from asyncdiff_rt.tiny import call_kwargs as tiny_kwargs

    kwargs = tiny_kwargs(
        case["kind"], steps=case.get("steps", 4), seed=0, size=case.get("size"), device=case.get("device", "cpu")
    )
    kwargs["output_type"] = "latent"
    kwargs.update(case.get("call", {}))
    if case.get("kill_rank") == rank:
        kwargs["callback_on_step_end"] = exit_at_step_2
    return kwargs


def exit_at_step_2(pipe, i, t, callback_kwargs):
    """A pipeline callback: the process exits at step 2, without a word (a peer dying mid-run)."""
    if i == 2:
        os._exit(3)
    return callback_kwargs


def latents(out) -> torch.Tensor:
    from asyncdiff_rt.tiny import output_of

    return output_of(out).detach().clone().cpu()


class WorldResults:
    """The parent's side: every case of one world size run in one spawn (once per test session), by name."""

    def __init__(self, worker):
        self.worker = worker
        self._done: dict = {}

    def __call__(self, world: int, cases: dict) -> dict:
        if world not in self._done:
            from asyncdiff_rt.tools.launch import spawn

            names = list(cases)
            per_rank = spawn(self.worker, world, [cases[n] for n in names], timeout_s=900)
            self._done[world] = {n: [r[i] for r in per_rank] for i, n in enumerate(names)}
        return self._done[world]


def ok(per_rank) -> list:
    """Each rank's ok payload; fails naming the rank that raised."""
    for rank, got in enumerate(per_rank):
        assert got[0] == "ok", f"rank {rank}: {got}"
    return [got[1] for got in per_rank]
