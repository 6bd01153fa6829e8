"""`asyncdiff-rt demo`: the built-in tiny pipeline, sequential vs asynchronous, anywhere, no downloads.

Runs the exact pipeline in this process, then the asynchronous one on `model_n + stride - 1` worker processes
(started here, or the torchrun ranks when launched by torchrun), and the simulator; prints both times, the
fidelity against the exact run, the agreement with the simulator, and writes both images as PNG.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    model_n: int = 2
    stride: int = 1
    warm_up: int = 2
    steps: int = 10
    seed: int = 0
    transport: str = "auto"
    out: str = "demo_out"
    prompt: str = "a watercolor painting of a lighthouse at dawn"


def _call_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    from ..tiny import call_kwargs

    kwargs = call_kwargs("demo", steps=cfg.steps, seed=cfg.seed)
    kwargs.update(prompt=cfg.prompt, output_type="latent")
    return kwargs


def _latents(out: Any) -> torch.Tensor:
    return out.images if hasattr(out, "images") else out[0]


def _timed(pipe: Any, cfg: DemoConfig) -> tuple[torch.Tensor, float]:
    pipe(**{**_call_kwargs(cfg), "num_inference_steps": 2})  # warm: allocator, kernels, first-call set-up
    kwargs = _call_kwargs(cfg)  # a fresh generator: the same noise as every other run of this config
    start = time.perf_counter()
    latents = _latents(pipe(**kwargs))
    return latents, time.perf_counter() - start


def _async_worker(rank: int, world: int, cfg_dict: dict) -> dict[str, Any] | None:
    import asyncdiff_rt
    from asyncdiff_rt.tiny import make_pipeline

    cfg = DemoConfig(**cfg_dict)
    pipe = make_pipeline("demo", seed=cfg.seed)
    if rank != 0:
        pipe.set_progress_bar_config(disable=True)
    ad = asyncdiff_rt.AsyncDiff(
        pipe, model_n=cfg.model_n, stride=cfg.stride, warm_up=cfg.warm_up, transport=cfg.transport
    )
    pipe(**{**_call_kwargs(cfg), "num_inference_steps": 2})  # warm
    ad.record_timeline()
    kwargs = _call_kwargs(cfg)
    start = time.perf_counter()
    latents = _latents(pipe(**kwargs))
    seconds = time.perf_counter() - start
    timeline = ad.gather_timeline()
    result = (
        {"latents": latents, "seconds": seconds, "plan": ad.plan.to_dict(), "timeline": timeline} if rank == 0 else None
    )
    ad.remove()
    return result


def _save_png(pipe: Any, latents: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        pipe.image_processor.postprocess(image, output_type="pil")[0].save(path)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ..compiler.plan import Plan
    from ..simulators.segments import simulate
    from ..tiny import make_pipeline
    from .fidelity import compare, format_fidelity
    from .launch import spawn

    world = cfg.model_n + cfg.stride - 1
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and int(os.environ["RANK"]) != 0:
        _async_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), asdict(cfg))
        return {}

    pipe = make_pipeline("demo", seed=cfg.seed)
    print(
        f"demo: built-in tiny SD-shaped pipeline, {cfg.steps} steps, model_n={cfg.model_n}, stride={cfg.stride}, "
        f"warm_up={cfg.warm_up}, {world} process(es)"
    )
    exact, t_exact = _timed(pipe, cfg)
    if under_torchrun:
        result = _async_worker(0, world, asdict(cfg))
    else:
        result = spawn(_async_worker, world, asdict(cfg), timeout_s=600)[0]
    plan = Plan.from_spec(result["plan"])
    simulated = _latents(simulate(pipe, plan=plan, stride=cfg.stride, warm_up=cfg.warm_up, **_call_kwargs(cfg)))
    vs_exact, vs_sim = compare(exact, result["latents"]), compare(simulated, result["latents"])
    os.makedirs(cfg.out, exist_ok=True)
    _save_png(pipe, exact, os.path.join(cfg.out, "sequential.png"))
    _save_png(pipe, result["latents"], os.path.join(cfg.out, "asynchronous.png"))
    from ..compiler.plan_table import format_plan_table

    print(format_plan_table(plan))
    threads, per_worker = torch.get_num_threads(), max(1, (os.cpu_count() or 1) // world)
    speedup = t_exact / result["seconds"]
    print(f"sequential:   1 process x {threads} thread(s)     {t_exact * 1000:8.1f} ms")
    print(
        f"asynchronous: {world} processes x {per_worker} thread(s)  {result['seconds'] * 1000:8.1f} ms"
        f"  ({speedup:.2f}x)"
    )
    print("  (on a CPU the processes share this machine's cores and memory bandwidth; the speed-up is made for GPUs)")
    print(f"fidelity vs sequential:  {format_fidelity(vs_exact)}")
    print(f"agreement with simulate: max |diff| {vs_sim['max_abs']:.3g} (the runtime computes the definition)")
    print(f"images: {os.path.join(cfg.out, 'sequential.png')}, {os.path.join(cfg.out, 'asynchronous.png')}")
    try:
        from ..runtime.timeline import draw_timeline

        path = os.path.join(cfg.out, "timeline.png")
        draw_timeline(
            result["timeline"], path, f"demo: model_n={cfg.model_n}, stride={cfg.stride}, warm_up={cfg.warm_up}"
        )
        print(f"timeline of the asynchronous run (compute and exposed communication per rank): {path}")
    except ImportError:
        print("timeline: install matplotlib to draw it")
    return {"seconds_exact": t_exact, "seconds_async": result["seconds"], "vs_exact": vs_exact, "vs_sim": vs_sim}
