"""Worker side of the distributed CPU tests: every rank runs the same list of cases over gloo.

A case is a dict: kind ("toy" or a tiny pipeline kind), plan, stride, warm_up, time_shift, stride_eps, steps,
calls (pipeline calls in a row), and optionally "rank_plans" (a plan per rank, to provoke disagreement),
"model_n" without a plan, "rank_seed" (a different generator seed per rank), "callback" ("drop_cfg" turns CFG off
mid-run), "delay_rank" ((rank, seconds): that rank's host sleeps after step 2, its peers wait for it), "call"
(extra pipeline kwargs), "no_generator". Every rank returns, per case, a dict with "status" ("ok" or "error"),
"error" (type and message), "transport" (the one it ran on), "captures" (CUDA graphs captured), "outputs" (the
pipeline's first output per call), and "param_bytes"/"expected_bytes" (the denoiser bytes this rank holds, and own
blocks + replicated counted apart).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def set_case_env(case: dict) -> Callable[[], None]:
    """Set the case's environment variables (`env`, e.g. the transports' slot cap) and return what restores them."""
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


def build(kind: str, device: str = "cpu"):
    """A fresh pipeline per case: AsyncDiff frees the weights of blocks other ranks own."""
    if kind == "toy":
        from toy import ToyPipeline

        return ToyPipeline(6)
    from asyncdiff_rt.tiny import make_pipeline

    return make_pipeline(kind, seed=0, device=device)


def first_output(out):
    for key in ("images", "frames"):
        if hasattr(out, key):
            value = getattr(out, key)
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return out[0]


def pipeline_kwargs(case: dict, rank: int = 0) -> dict:
    from asyncdiff_rt.tiny import call_kwargs

    kwargs = call_kwargs(  # the generator on the case's device: CPU and CUDA generators draw different noise
        case["kind"],
        steps=case.get("steps", 4),
        seed=case.get("seed", 0) + case.get("rank_seed", 0) * rank,
        device=case.get("device", "cpu"),
    )
    kwargs["output_type"] = case.get("output_type", "latent")
    kwargs.update(case.get("call", {}))
    kwargs.update(case.get("rank_call", {}).get(rank, {}))  # one rank calls differently: must be refused
    if case.get("no_generator"):
        kwargs.pop("generator", None)
    if case.get("kill_rank") == rank:
        from spawn_cases import exit_at_step_2

        kwargs["callback_on_step_end"] = exit_at_step_2
    if case.get("delay_rank") is not None and case["delay_rank"][0] == rank:
        delay_s = case["delay_rank"][1]

        def delay(pipe, i, t, callback_kwargs):
            if i == 2:
                time.sleep(delay_s)
            return callback_kwargs

        kwargs["callback_on_step_end"] = delay
    if case.get("callback") == "drop_cfg":

        def drop_cfg(pipe, i, t, callback_kwargs):
            if i == 1:
                pipe._guidance_scale = 0.0
                callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            return callback_kwargs

        kwargs["callback_on_step_end"] = drop_cfg
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds"]
    return kwargs


def call(case: dict, pipe, rank: int):
    if case["kind"] == "toy":
        pipe.scheduler = type(pipe.scheduler)(case.get("steps", 6))
        return torch.tensor(pipe(), dtype=torch.float64)
    return first_output(pipe(**pipeline_kwargs(case, rank)))


def own_plus_replicated_bytes(denoiser, plan, owned: set[str]) -> int:
    listed = dict(denoiser.named_modules())
    in_listed = set()
    for name in plan.blocks:
        in_listed |= {id(t) for t in list(listed[name].parameters()) + list(listed[name].buffers())}
    total = 0
    for t in list(denoiser.parameters()) + list(denoiser.buffers()):
        if id(t) not in in_listed:
            total += t.numel() * t.element_size()
    for name in owned:
        total += sum(
            t.numel() * t.element_size() for t in list(listed[name].parameters()) + list(listed[name].buffers())
        )
    return total


def exact_gpu_math() -> None:
    """fp32 without TF32 and with fixed cuDNN algorithms, so processes compare with the simulator tightly."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run_cases(rank: int, world: int, cases: list[dict]):
    import asyncdiff_rt

    exact_gpu_math()
    from asyncdiff_rt.models.denoiser import find_denoiser
    from asyncdiff_rt.strategies.segments.schedule import roles

    results = []
    for case in cases:
        if case.get("device") == "per_rank":  # one GPU per rank (multigpu tests)
            case = dict(case, device=f"cuda:{rank}")
            torch.cuda.set_device(rank)
        pipe = build(case["kind"], case.get("device", "cpu"))
        if case.get("dtype_on_rank1") and rank == 1:
            pipe.unet.to(case["dtype_on_rank1"])
        plan = case.get("rank_plans", [case.get("plan")] * world)[rank]
        restore_env = set_case_env(case)
        result: dict = {"status": "ok"}
        ad = None
        t_calls = None
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
                drop_weights=case.get("drop_weights"),
                graphs=case.get("graphs"),
            )
            if case.get("schedule_swap"):
                from diffusers import HeunDiscreteScheduler

                pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
            if case.get("timeline"):
                ad.record_timeline()
            result["transport"] = ad.transport_name
            t_calls = time.monotonic()
            outputs = [call(case, pipe, rank) for _ in range(case.get("calls", 1))]
            result["captures"] = ad.captures
            if case.get("timeline"):
                result["timeline"] = ad.gather_timeline()
            outputs = [x.cpu() for x in outputs]
            result["outputs"] = outputs if (rank == 0 or case.get("all_outputs")) else None
            if case.get("bytes"):
                _, den = find_denoiser(pipe)
                seg = roles(ad.model_n, ad.stride)[rank]
                result["param_bytes"] = ad.parameter_bytes()
                result["dropped_bytes"] = ad.dropped_bytes
                full = build(case["kind"])
                _, full_den = find_denoiser(full)
                result["expected_bytes"] = own_plus_replicated_bytes(
                    full_den, ad.plan, set(ad.plan.segments[seg].blocks)
                )
                result["full_bytes"] = sum(t.numel() * t.element_size() for t in full_den.parameters()) + sum(
                    t.numel() * t.element_size() for t in full_den.buffers()
                )
        except Exception as err:  # noqa: BLE001 - the test inspects it
            result = {"status": "error", "error": (type(err).__name__, str(err))}
            result["call_s"] = None if t_calls is None else time.monotonic() - t_calls  # how long the calls ran
        finally:
            if ad is not None:
                ad.remove()
        if case.get("call_after_remove") and result["status"] == "ok":
            try:  # the pipeline lost other ranks' weights: its next call must say so, not fail inside torch
                call(case, pipe, rank)
                result["after_remove"] = ("ok", "")
            except Exception as err:  # noqa: BLE001
                result["after_remove"] = (type(err).__name__, str(err))
        restore_env()
        results.append(result)
    return results
