"""`asyncdiff-rt generate`: a real model (local diffusers folder or model id) with asynchronous denoising.

    torchrun --nproc_per_node=3 -m asyncdiff_rt generate --model PATH --model_n 3 --warm_up 3 --out out.png

One process per rank (torchrun). Not under torchrun, it starts the `model_n + stride - 1` worker processes itself
(`asyncdiff_rt.tools.launch.spawn`), or with `--transport local` runs every segment in this one process. Each rank
loads `DiffusionPipeline.from_pretrained(model, dtype=...)` (float16 on CUDA, float32 on a CPU by default) onto
cuda:LOCAL_RANK (the CPU without CUDA), attaches `AsyncDiff`, and calls the pipeline; rank 0 saves the image (PNG)
or the video (GIF, or one PNG per frame) and prints the latency. Text-to-image and text-to-video pipelines only:
pipelines that need an input image (inpainting, upscaling, ControlNet, image-to-video) have example scripts in
examples/ that take them.

The helpers here (device, dtype, launching, saving) are shared with the example scripts (examples/common.py).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from .quiet import quiet_third_party

quiet_third_party()  # also in the worker processes, which import this module

__all__ = [
    "generate",
    "pick_device",
    "pick_dtype",
    "under_torchrun",
    "run_ranks",
    "save_output",
    "output_items",
    "synchronize",
    "from_pretrained_kwargs",
]

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# input images this command does not take (text-to-image and text-to-video pipelines have none of these)
_INPUTS = ("image", "mask_image", "control_image")


# ---- shared helpers -------------------------------------------------------------------------------------------


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (one GPU per rank), else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`name` ("float16", "bfloat16", "float32"), or by default float16 on CUDA and float32 on the CPU."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def from_pretrained_kwargs(dtype: torch.dtype, rank: int = 0) -> dict[str, Any]:
    """Keyword arguments for diffusers' from_pretrained: `dtype` (not the deprecated `torch_dtype`), and without
    accelerate `low_cpu_mem_usage=False`, which is what diffusers falls back to anyway, minus its warning per
    component and per rank; rank 0 says once what accelerate would bring."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return {"dtype": dtype}
    if rank == 0:
        print("note: `pip install accelerate` loads models faster and with less memory", file=sys.stderr)
    return {"dtype": dtype, "low_cpu_mem_usage": False}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, transport: str = "auto", timeout_s: float = 3600.0):
    """Run `fn(rank, world, *args)` on every rank: this process's rank under torchrun; this process alone with
    transport "local" (or a world of one); otherwise `world` worker processes started here (torchrun's
    environment, gloo on the CPU or NCCL between GPUs). Returns rank 0's result, or None on other torchrun ranks.
    `fn` must be importable by the workers (a module-level function; in a script, guard with __main__). A failing
    worker raises `launch.WorkerError` (every rank's error; `user_errors.worker_message` is the one line to show)."""
    if under_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if transport != "local" and size != world:
            raise SystemExit(
                f"this configuration needs {world} processes (model_n + stride - 1, x2 with cfg_parallel) but torchrun "
                f"started {size}: use torchrun --nproc_per_node={world}"
            )
        result = fn(rank, size, *args)
        return result if rank == 0 else None
    if transport == "local" or world == 1:
        return fn(0, 1, *args)
    from .launch import spawn

    return spawn(fn, world, *args, timeout_s=timeout_s)[0]


def output_items(out: Any) -> tuple[str, list[Any]]:
    """("video", [frames of each video]) or ("image", [images]) from a pipeline's output object."""
    frames = getattr(out, "frames", None)
    if frames is not None:
        return "video", list(frames)
    return "image", list(out.images)


def _numbered(path: str, i: int, n: int) -> str:
    if n == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{i}{ext}"


def save_output(out: Any, path: str, fps: int = 8) -> list[str]:
    """Save a pipeline output (output_type "pil"): images as PNG; each video as an animated GIF (path ending in
    .gif) or as one PNG per frame (path_000.png, ...). Several images or videos get _1, _2 ... suffixes.
    Returns the paths written."""
    kind, items = output_items(out)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    written = []
    for i, item in enumerate(items):
        target = _numbered(path, i, len(items))
        if kind == "image":
            item.save(target)
            written.append(target)
            continue
        frames = list(item)
        if target.lower().endswith(".gif"):
            frames[0].save(target, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
            written.append(target)
        else:
            stem, ext = os.path.splitext(target)
            for j, frame in enumerate(frames):
                frame_path = f"{stem}_{j:03d}{ext or '.png'}"
                frame.save(frame_path)
                written.append(frame_path)
    return written


# ---- the command ----------------------------------------------------------------------------------------------


def call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    """The pipeline class's own __call__ parameters (AsyncDiff wraps the call in a subclass of the class)."""
    for cls in type(pipe).__mro__:
        if not getattr(cls, "_asyncdiff_rt_hooked", False) and "__call__" in vars(cls):
            return dict(inspect.signature(cls.__call__).parameters)
    return dict(inspect.signature(type(pipe).__call__).parameters)


def _call_kwargs(pipe: Any, opts: dict, device: torch.device) -> dict[str, Any]:
    params = call_params(pipe)
    needs = [n for n in _INPUTS if n in params]
    if needs:
        raise SystemExit(
            f"{type(pipe).__name__} takes {', '.join(needs)}, which `asyncdiff-rt generate` does not: use the example "
            "script for this pipeline (examples/README.md)"
        )
    kwargs: dict[str, Any] = {
        "prompt": opts.get("prompt") or DEFAULT_PROMPT,
        "num_inference_steps": opts["steps"],
        "generator": torch.Generator(device=device).manual_seed(opts.get("seed", 0)),
        "output_type": "pil",
    }
    for name in ("height", "width"):
        if opts.get(name) is not None:
            kwargs[name] = opts[name]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise SystemExit(f"{type(pipe).__name__} does not take {', '.join(unknown)}")
    return kwargs


def _generate_rank(rank: int, world: int, opts: dict) -> dict[str, Any] | None:
    from diffusers import DiffusionPipeline

    import asyncdiff_rt

    device = pick_device()
    dtype = pick_dtype(opts.get("dtype"), device)
    pipe = DiffusionPipeline.from_pretrained(opts["model"], **from_pretrained_kwargs(dtype, rank))
    pipe = pipe.to(device)
    if rank != 0:
        pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs(pipe, opts, device)  # before attaching: a pipeline this command cannot drive fails here
    ad = asyncdiff_rt.AsyncDiff(
        pipe,
        model_n=opts["model_n"],
        stride=opts["stride"],
        warm_up=opts["warm_up"],
        time_shift=opts.get("time_shift", False),
        plan=opts.get("plan"),
        transport=opts["transport"],
    )
    try:
        synchronize(device)
        start = time.perf_counter()
        out = pipe(**kwargs)
        synchronize(device)
        seconds = time.perf_counter() - start
        if rank != 0:
            return None
        paths = save_output(out, opts["out"])
        print(
            f"{type(pipe).__name__}: {opts['steps']} steps, model_n={ad.model_n}, stride={ad.stride}, "
            f"warm_up={ad.warm_up}, {ad.world_needed} rank(s), transport={ad.transport_name}, {device}, {dtype}: "
            f"latency {seconds:.3f} s"
        )
        print(f"saved {', '.join(paths)}")
        return {"seconds": seconds, "paths": paths}
    finally:
        ad.remove()


def check_model(model: str) -> None:
    """A path that is not a diffusers folder fails here, once, not in every worker. A model id ("org/name": one
    slash, no leading "/", "." or "~") is left to from_pretrained (it may be in the Hugging Face cache)."""
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(f"{model} is a folder but not a diffusers pipeline (no model_index.json in it)")
    elif looks_like_path or os.path.exists(path):
        raise ConfigError(
            f"no such folder: {model} (--model takes a local diffusers folder or a model id such as "
            "stabilityai/stable-diffusion-xl-base-1.0)"
        )


def generate(args: argparse.Namespace) -> dict[str, Any] | None:
    """The body of `asyncdiff-rt generate` (arguments: see asyncdiff_rt.tools.cli). Returns rank 0's
    {"seconds", "paths"} (None on other ranks)."""
    opts = dict(vars(args))
    opts.pop("func", None)
    check_model(opts["model"])
    world = opts["model_n"] + opts["stride"] - 1
    return run_ranks(_generate_rank, world, opts, transport=opts["transport"])
