"""Worker side of the distributed CPU tests: every rank runs the same list of cases over gloo.

A case is a dict: kind ("toy" or a tiny pipeline kind), plan, stride, warm_up, time_shift, stride_eps, steps,
calls (pipeline calls in a row), and optionally "rank_plans" (a plan per rank, to provoke disagreement) or
"model_n" without plan. Rank 0 returns, per case, ("ok", [outputs]) or ("error", type, message); other ranks
return the same for errors so a test can check that no rank was left waiting.
"""

from __future__ import annotations

import torch

_PIPES: dict = {}


def build(kind: str):
    if kind not in _PIPES:
        if kind == "toy":
            from toy import ToyPipeline

            _PIPES[kind] = ToyPipeline(6)
        else:
            from asyncdiff_rt.tiny import make_pipeline

            _PIPES[kind] = make_pipeline(kind, seed=0)
    return _PIPES[kind]


def call(kind: str, pipe, steps: int):
    if kind == "toy":
        pipe.scheduler = type(pipe.scheduler)(steps)
        return torch.tensor(pipe(), dtype=torch.float64)
    from asyncdiff_rt.tiny import call_kwargs

    kwargs = call_kwargs(kind, steps=steps, seed=0)
    kwargs["output_type"] = "latent"
    out = pipe(**kwargs)
    return first_output(out)


def first_output(out):
    for key in ("images", "frames"):
        if hasattr(out, key):
            value = getattr(out, key)
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return out[0]


def run_cases(rank: int, world: int, cases: list[dict]):
    import asyncdiff_rt

    results = []
    for case in cases:
        pipe = build(case["kind"])
        plan = case.get("rank_plans", [case.get("plan")] * world)[rank]
        try:
            ad = asyncdiff_rt.AsyncDiff(
                pipe,
                model_n=case.get("model_n", len(plan) if plan else 2),
                stride=case.get("stride", 1),
                warm_up=case.get("warm_up", 1),
                time_shift=case.get("time_shift", False),
                plan=plan,
                transport=case.get("transport", "gloo"),
                stride_eps=case.get("stride_eps", "reuse"),
                timeout_s=case.get("timeout_s", 60),
                debug=case.get("debug", False),
            )
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results.append(("error", type(err).__name__, str(err)))
            continue
        try:
            outs = [call(case["kind"], pipe, case.get("steps", 4)) for _ in range(case.get("calls", 1))]
            results.append(("ok", outs if rank == 0 else None))
        except Exception as err:  # noqa: BLE001
            results.append(("error", type(err).__name__, str(err)))
        finally:
            ad.remove()
    return results
