"""`asyncdiff-rt demo`: the built-in tiny pipeline, sequential vs asynchronous, anywhere, no downloads.

Runs the exact pipeline in one worker process, then the asynchronous one on `model_n + stride - 1` worker
processes (started here, or the torchrun ranks when launched by torchrun), and the simulator; prints both times,
the fidelity against the exact run, the agreement with the simulator, and writes both images and the timeline of
the asynchronous run as PNG.

Both sides run with the same number of threads per process (one process stands for one GPU): timed in this
process with its own thread count, the sequential side slowed on a busy machine while the workers did not, and
the speed-up read 36x. On a CPU the figure still is not the point; the GPU tables in benchmarks/results are.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .quiet import quiet_third_party

__all__ = ["DemoConfig", "run_demo"]

quiet_third_party()  # also in the worker processes, which import this module


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

    def check(self) -> None:
        """Refuse what cannot run, before any process starts (one line on the command line, not a traceback)."""
        if self.model_n < 1:
            raise ConfigError(f"--model_n must be 1 or more (segments, one per process), got {self.model_n}")
        if self.stride not in (1, 2):
            raise ConfigError(f"--stride must be 1 or 2, got {self.stride}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be 1 or more, got {self.steps}")
        if self.warm_up < 1:
            raise ConfigError(f"--warm_up must be 1 or more (exact steps first), got {self.warm_up}")
        if self.transport in ("nccl", "ipc") and not torch.cuda.is_available():
            raise ConfigError(
                f"--transport {self.transport} needs CUDA GPUs and none is visible; on a CPU use gloo, shm or local "
                "(or auto, which picks gloo); see docs/transports.md"
            )


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


def _sequential_worker(rank: int, world: int, cfg_dict: dict, threads: int) -> dict[str, Any]:
    """The exact pipeline in a fresh process with `threads` threads: the same budget as each asynchronous rank."""
    from asyncdiff_rt.tiny import make_pipeline

    torch.set_num_threads(threads)
    cfg = DemoConfig(**cfg_dict)
    pipe = make_pipeline("demo", seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    latents, seconds = _timed(pipe, cfg)
    return {"latents": latents, "seconds": seconds, "threads": torch.get_num_threads()}


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
        {
            "latents": latents,
            "seconds": seconds,
            "plan": ad.plan.to_dict(),
            "timeline": timeline,
            "threads": torch.get_num_threads(),
        }
        if rank == 0
        else None
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
    from ..compiler.plan_table import format_plan_table
    from ..simulators.segments import simulate
    from ..tiny import make_pipeline
    from .fidelity import compare, format_fidelity
    from .launch import spawn

    cfg.check()
    world = cfg.model_n + cfg.stride - 1
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and int(os.environ["RANK"]) != 0:
        _async_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), asdict(cfg))
        return {}

    print(
        f"demo: built-in tiny SD-shaped pipeline with random weights, {cfg.steps} steps, model_n={cfg.model_n}, "
        f"stride={cfg.stride}, warm_up={cfg.warm_up}, {world} process(es)\n"
        "  random weights: the images are coloured noise and look alike; what matters is how close the asynchronous\n"
        "  one is to the sequential one (the fidelity line), and that the runtime matches the simulator"
    )
    if under_torchrun:  # the ranks are there already: time the sequential side here, with a rank's threads
        exact, t_exact = _timed(make_pipeline("demo", seed=cfg.seed), cfg)
        seq = {"latents": exact, "seconds": t_exact, "threads": torch.get_num_threads()}
        result = _async_worker(0, world, asdict(cfg))
    else:
        threads = max(1, (os.cpu_count() or 1) // world)  # what launch.spawn gives each asynchronous rank
        seq = spawn(_sequential_worker, 1, asdict(cfg), threads, timeout_s=600)[0]
        result = spawn(_async_worker, world, asdict(cfg), timeout_s=600)[0]
    pipe = make_pipeline("demo", seed=cfg.seed)
    exact, t_exact = seq["latents"], seq["seconds"]
    plan = Plan.from_spec(result["plan"])
    simulated = _latents(simulate(pipe, plan=plan, stride=cfg.stride, warm_up=cfg.warm_up, **_call_kwargs(cfg)))
    vs_exact, vs_sim = compare(exact, result["latents"]), compare(simulated, result["latents"])
    os.makedirs(cfg.out, exist_ok=True)
    images = [os.path.join(cfg.out, "sequential.png"), os.path.join(cfg.out, "asynchronous.png")]
    _save_png(pipe, exact, images[0])
    _save_png(pipe, result["latents"], images[1])

    print(format_plan_table(plan))
    speedup = t_exact / result["seconds"]
    print(f"sequential:   1 process  x {seq['threads']} thread(s)  {t_exact * 1000:8.1f} ms")
    print(
        f"asynchronous: {world} processes x {result['threads']} thread(s)  {result['seconds'] * 1000:8.1f} ms"
        f"  ({speedup:.2f}x)"
    )
    print(
        "  on a CPU this figure is not the point: the processes share the cores, the memory bandwidth and the load of\n"
        "  whatever else runs here; each process stands for one GPU and has the same threads. The speed-ups that\n"
        "  matter are the GPU tables in benchmarks/results."
    )
    print(f"fidelity vs sequential:  {format_fidelity(vs_exact)}")
    print(f"agreement with simulate: max |diff| {vs_sim['max_abs']:.3g} (the runtime computes the definition)")
    print(f"images: {images[0]}, {images[1]}")
    try:
        from ..runtime.timeline import draw_timeline

        path = os.path.join(cfg.out, "timeline.png")
        draw_timeline(
            result["timeline"],
            path,
            f"demo: model_n={cfg.model_n}, stride={cfg.stride}, warm_up={cfg.warm_up}",
            steps=cfg.steps,
        )
        print(f"timeline of the asynchronous run (compute and exposed communication per rank): {path}")
    except ImportError:
        print("timeline: install matplotlib to draw it")
    return {"seconds_exact": t_exact, "seconds_async": result["seconds"], "vs_exact": vs_exact, "vs_sim": vs_sim}
