"""Worker side of the CFG-parallel tests (tests/test_cfg_parallel.py). Pipelines in float64, so that computing
the guidance halves apart (batch 1 against batch 2 kernels) rounds at 1e-10, far below what a wrong split moves.

A case: kind, model_n, stride, plan (None: one segment), transport, cfg (cfg_parallel), calls (pipeline calls in a
row), call (extra call kwargs), kill_rank (that rank exits at step 2), rank_cfg (cfg_parallel per rank).
Every rank returns per case ("ok", [latents per call]) or ("error", type name, message).
"""

from __future__ import annotations

import torch
from spawn_cases import DTYPE, call_kwargs, latents, pipe_of  # noqa: F401 - the workers' shared part


def run_cases(rank: int, world: int, cases: list[dict]) -> list:
    torch.set_num_threads(1)
    from asyncdiff_rt import AsyncDiff

    results = []
    for case in cases:
        pipe = pipe_of(case["kind"], case.get("device", "cpu"))
        ad = None
        try:
            cfg = case.get("rank_cfg", [True] * world)[rank] if "rank_cfg" in case else case.get("cfg", True)
            ad = AsyncDiff(
                pipe,
                model_n=case.get("model_n", 1),
                stride=case.get("stride", 1),
                warm_up=case.get("warm_up", 1),
                plan=case.get("plan"),
                transport=case.get("transport", "gloo"),
                timeout_s=case.get("timeout_s", 60),
                cfg_parallel=cfg,
            )
            outs = []
            for _ in range(case.get("calls", 1)):
                with torch.no_grad():
                    outs.append(latents(pipe(**call_kwargs(case, rank))))
            results.append(("ok", outs))
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results.append(("error", type(err).__name__, str(err)))
        finally:
            if ad is not None:
                ad.remove()
    return results


def halves_reference(case: dict) -> torch.Tensor:
    """Plain diffusers with the denoiser run once per guidance half (what CFG parallelism computes), written
    apart from the runtime: every tensor argument whose leading size is a multiple of the batch is halved."""
    pipe = pipe_of(case["kind"], case.get("device", "cpu"))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    forward = denoiser.forward

    def per_half(*args, **kwargs):
        sample = args[0] if args else next(iter(kwargs.values()))
        batch = sample.shape[0]

        def half(x, h):
            if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] % batch == 0:
                n = x.shape[0] // 2
                return x[h * n : (h + 1) * n]
            if isinstance(x, dict):
                return {k: half(v, h) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(half(v, h) for v in x)
            return x

        outs = [forward(*half(list(args), h), **half(kwargs, h)) for h in (0, 1)]
        first = [o if isinstance(o, torch.Tensor) else o[0] for o in outs]
        eps = torch.cat(first)
        if isinstance(outs[0], torch.Tensor):
            return eps
        if isinstance(outs[0], tuple):
            return (eps, *outs[0][1:])
        outs[0].sample = eps  # a diffusers output object (return_dict=True: AnimateDiff's pipeline reads .sample)
        return outs[0]

    denoiser.forward = per_half
    torch.set_num_threads(1)
    with torch.no_grad():
        return latents(pipe(**call_kwargs(case)))


def simulated(case: dict) -> torch.Tensor:
    from asyncdiff_rt import simulate

    pipe = pipe_of(case["kind"], case.get("device", "cpu"))
    torch.set_num_threads(1)
    with torch.no_grad():
        out = simulate(
            pipe, plan=case["plan"], stride=case.get("stride", 1), warm_up=case.get("warm_up", 1),
            cfg_parallel=True, **call_kwargs(case),
        )  # fmt: skip
    return latents(out)


def plain(case: dict) -> torch.Tensor:
    pipe = pipe_of(case["kind"], case.get("device", "cpu"))
    torch.set_num_threads(1)
    with torch.no_grad():
        return latents(pipe(**call_kwargs(case)))
