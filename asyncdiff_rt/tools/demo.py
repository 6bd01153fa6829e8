"""`asyncdiff-rt demo`: the built-in tiny pipeline, sequential vs asynchronous, anywhere, no downloads.

Runs the asynchronous pipeline on `model_n + stride - 1` worker processes (started here, or the torchrun ranks
when launched by torchrun); then rank 0 runs the exact pipeline and the simulator and writes both images and the
timeline of the asynchronous run as PNG; this process prints both times, the fidelity against the exact run and
the agreement with the simulator. One spawn, and this process never builds a pipeline: the demo starts once.

Both sides run with the same number of threads per process (one process stands for one GPU), and the sequential
side runs after the other ranks have finished: timed in this process with its own thread count, it slowed on a
busy machine while the workers did not, and the speed-up read 36x. On a CPU the figure still is not the point;
the GPU tables in benchmarks/results are.
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


def _sequential(cfg: DemoConfig) -> dict[str, Any]:
    """The exact pipeline, timed in this rank-0 worker after the asynchronous run (its peers have finished, so it
    has the machine to itself) with the same thread count as each asynchronous rank had."""
    from asyncdiff_rt.tiny import make_pipeline

    pipe = make_pipeline("demo", seed=cfg.seed)  # fresh: the asynchronous one dropped other ranks' weights
    pipe.set_progress_bar_config(disable=True)
    latents, seconds = _timed(pipe, cfg)
    return {"pipe": pipe, "latents": latents, "seconds": seconds, "threads": torch.get_num_threads()}


def _async_worker(rank: int, world: int, cfg_dict: dict) -> dict[str, Any] | None:
    """One asynchronous rank; rank 0 then times the sequential run, simulates, and writes the images."""
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
    plan, threads = ad.plan.to_dict(), torch.get_num_threads()
    ad.remove()
    if rank != 0:
        return None
    return _finish(cfg, world, {"latents": latents, "seconds": seconds, "plan": plan, "timeline": timeline,
                                "threads": threads})  # fmt: skip


def _save_png(pipe: Any, latents: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        pipe.image_processor.postprocess(image, output_type="pil")[0].save(path)


def _finish(cfg: DemoConfig, world: int, result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 after the asynchronous run: the sequential run, the simulator, the images and the timeline."""
    from ..compiler.plan import Plan
    from ..simulators.segments import simulate
    from .fidelity import compare

    seq = _sequential(cfg)
    pipe, exact = seq.pop("pipe"), seq["latents"]
    plan = Plan.from_spec(result["plan"])
    simulated = _latents(simulate(pipe, plan=plan, stride=cfg.stride, warm_up=cfg.warm_up, **_call_kwargs(cfg)))
    os.makedirs(cfg.out, exist_ok=True)
    images = [os.path.join(cfg.out, "sequential.png"), os.path.join(cfg.out, "asynchronous.png")]
    _save_png(pipe, exact, images[0])
    _save_png(pipe, result["latents"], images[1])
    timeline = None
    try:
        from ..runtime.timeline import draw_timeline

        timeline = os.path.join(cfg.out, "timeline.png")
        draw_timeline(
            result["timeline"],
            timeline,
            f"demo: model_n={cfg.model_n}, stride={cfg.stride}, warm_up={cfg.warm_up}",
            steps=cfg.steps,
        )
    except ImportError:
        pass
    return {
        "plan": result["plan"], "seconds_exact": seq["seconds"], "seconds_async": result["seconds"],
        "threads_exact": seq["threads"], "threads_async": result["threads"], "images": images, "timeline": timeline,
        "vs_exact": compare(exact, result["latents"]), "vs_sim": compare(simulated, result["latents"]),
    }  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ..compiler.plan import Plan
    from ..compiler.plan_table import format_plan_table
    from .fidelity import format_fidelity
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
        "  one is to the sequential one (the fidelity line), and that the runtime matches the simulator",
        flush=True,
    )
    if under_torchrun:  # the ranks are there already: this process is rank 0
        res = _async_worker(0, world, asdict(cfg))
    else:
        res = spawn(_async_worker, world, asdict(cfg), timeout_s=600)[0]
    print(format_plan_table(Plan.from_spec(res["plan"])))
    t_exact, t_async = res["seconds_exact"], res["seconds_async"]
    print(f"sequential:   1 process  x {res['threads_exact']} thread(s)  {t_exact * 1000:8.1f} ms")
    print(
        f"asynchronous: {world} processes x {res['threads_async']} thread(s)  {t_async * 1000:8.1f} ms"
        f"  ({t_exact / t_async:.2f}x)"
    )
    print(
        "  on a CPU this figure is not the point: the processes share the cores, the memory bandwidth and the load of\n"
        "  whatever else runs here; each process stands for one GPU and has the same threads. The speed-ups that\n"
        "  matter are the GPU tables in benchmarks/results."
    )
    print(f"fidelity vs sequential:  {format_fidelity(res['vs_exact'])}")
    print(f"agreement with simulate: max |diff| {res['vs_sim']['max_abs']:.3g} (the runtime computes the definition)")
    print(f"images: {res['images'][0]}, {res['images'][1]}")
    if res["timeline"]:
        print(f"timeline of the asynchronous run (compute and exposed communication per rank): {res['timeline']}")
    else:
        print("timeline: install matplotlib to draw it")
    return {k: res[k] for k in ("seconds_exact", "seconds_async", "vs_exact", "vs_sim")}
