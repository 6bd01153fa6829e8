"""Shared parts of the example scripts: arguments, loading, launching, timing, saving.

Each `run_*.py` script names its diffusers pipeline class, the tiny built-in pipeline of that class (used when no
`--model` is given), the inputs the pipeline needs, and calls `main`. What `main` does on every rank:

1. pick the device (cuda:LOCAL_RANK, or the CPU) and dtype (float16 on CUDA, float32 on the CPU, or --dtype);
2. load the pipeline: `<Class>.from_pretrained(--model, dtype=...)`, or the tiny random-weight one;
3. attach `asyncdiff_rt.AsyncDiff(pipe, model_n, stride, warm_up, time_shift, plan=, transport=)`;
4. run `--warmup_runs` untimed calls (the first call traces the denoiser and sets up communication), then one
   timed call;
5. rank 0 saves the image (PNG) or video (GIF, or one PNG per frame) and prints the latency.

Launch: under torchrun (`torchrun --nproc_per_node=N examples/run_X.py ...`, N = model_n + stride - 1) each
process is one rank. Run as `python examples/run_X.py ...`, the script starts the N worker processes itself
(asyncdiff_rt.tools.launch.spawn: gloo on the CPU, NCCL on GPUs), or with `--transport local` runs every segment in
this one process (on a GPU: one device; on the CPU: the quickest way to try a script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from asyncdiff_rt.tools.generate import (
    DEFAULT_PROMPT,
    call_params,
    from_pretrained_kwargs,
    pick_device,
    pick_dtype,
    run_ranks,
    save_output,
    synchronize,
)
from asyncdiff_rt.tools.launch import WorkerError
from asyncdiff_rt.tools.user_errors import worker_is_user_error, worker_message

__all__ = ["parser", "main", "load_image", "require"]


def parser(description: str, *, video: bool = False) -> argparse.ArgumentParser:
    """The arguments every example takes (the AsyncDiff reference's names); scripts add their own inputs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local diffusers folder or model id; default: tiny built-in model")
    p.add_argument("--model_n", type=int, default=2, help="segments the denoiser is cut into (GPUs)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2), help="2: pairs of steps, one more rank")
    p.add_argument("--warm_up", type=int, default=3, help="exact steps before the asynchronous ones")
    p.add_argument("--time_shift", action="store_true", help="compute step k with the timestep of step k-1")
    p.add_argument("--transport", default="auto", choices=("auto", "nccl", "ipc", "shm", "gloo", "local"))
    p.add_argument(
        "--cfg_parallel",
        action="store_true",
        help="the two guidance halves (or FLUX's two true-CFG calls) on two halves of the ranks: 2x the processes",
    )
    p.add_argument("--plan", default=None, help="a saved plan (JSON, from `asyncdiff-rt plan --save`)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.add_argument("--prompt", default=None, help="default: a built-in prompt")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--height", type=int, default=None, help="default: the model's")
    p.add_argument("--width", type=int, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup_runs", type=int, default=1, help="untimed calls before the timed one")
    p.add_argument("--out", default="output.gif" if video else "output.png", help="where rank 0 saves the result")
    if video:
        p.add_argument("--num_frames", type=int, default=None, help="default: the model's")
        p.add_argument("--fps", type=int, default=7, help="frames per second of the saved GIF")
    return p


def load_image(path: str | None):
    """An input image file as RGB (PIL), or None."""
    if path is None:
        return None
    import PIL.Image

    return PIL.Image.open(path).convert("RGB")


def require(args: argparse.Namespace, *names: str) -> None:
    """With a real --model, the pipeline's input files must be given (the tiny model makes its own)."""
    missing = [f"--{n}" for n in names if getattr(args, n, None) is None]
    if args.model is not None and missing:
        raise SystemExit(f"with --model, pass {' and '.join(missing)}")


def main(
    kind: str,
    pipeline_class: str,
    args: argparse.Namespace,
    inputs: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
    components: Callable[[argparse.Namespace, torch.dtype], dict[str, Any]] | None = None,
) -> None:
    """Run the example on every rank (see the module docstring).

    kind: the tiny built-in pipeline (asyncdiff_rt.tiny) used without --model. pipeline_class: the diffusers
    class loaded with --model. inputs(args) -> call arguments the pipeline needs beyond the common ones (input
    images, strength, ...; None values keep the tiny model's). components(args, dtype) -> extra components for
    from_pretrained (a ControlNet, a MotionAdapter). Both must be module-level functions of the script.
    """
    if args.model is not None and inputs is not None:
        inputs(args)  # missing or unreadable input files fail here, before any process starts
    world = (args.model_n + args.stride - 1) * (2 if args.cfg_parallel else 1)
    spec = {"kind": kind, "pipeline_class": pipeline_class, "args": vars(args)}
    try:
        run_ranks(_rank_main, world, spec, inputs, components, transport=args.transport)
    except KeyboardInterrupt:
        sys.exit(130)
    except WorkerError as err:  # the first failing rank's message, once (each rank failed the same way)
        traceback = not worker_is_user_error(err)
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {worker_message(err, traceback=traceback)}")


def _load(spec: dict, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, components) -> Any:
    if args.model is None:
        from asyncdiff_rt.tiny import make_pipeline

        return make_pipeline(spec["kind"], dtype=dtype, device=device, seed=0, progress_bar=True)
    import diffusers

    cls = getattr(diffusers, spec["pipeline_class"])
    extra = components(args, dtype) if components is not None else {}
    return cls.from_pretrained(args.model, **from_pretrained_kwargs(dtype, int(os.environ.get("RANK", 0))), **extra).to(
        device
    )


def _call_kwargs(spec: dict, pipe: Any, args: argparse.Namespace, device: torch.device, inputs) -> dict[str, Any]:
    params = call_params(pipe)
    if args.model is None:  # the tiny model's own inputs: prompt, sizes, images made in code
        from asyncdiff_rt.tiny import call_kwargs

        kwargs = call_kwargs(spec["kind"], steps=args.steps, seed=args.seed, device=device, output_type="pil")
    else:
        kwargs = {"prompt": DEFAULT_PROMPT} if "prompt" in params else {}
    common = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "num_frames": getattr(args, "num_frames", None),
    }
    if inputs is not None:
        common.update(inputs(args))
    given = {k: v for k, v in common.items() if v is not None}
    unknown = [k for k in given if k not in params]
    if unknown:
        raise SystemExit(f"{type(pipe).__name__} does not take {', '.join('--' + k for k in unknown)}")
    kwargs.update(given)
    kwargs.update(
        num_inference_steps=args.steps,
        generator=torch.Generator(device=device).manual_seed(args.seed),  # the same noise on every rank
        output_type="pil",
    )
    return kwargs


def _rank_main(rank: int, world: int, spec: dict, inputs, components) -> None:
    import asyncdiff_rt

    args = argparse.Namespace(**spec["args"])
    device = pick_device()
    dtype = pick_dtype(args.dtype, device)
    pipe = _load(spec, args, device, dtype, components)
    if rank != 0:
        pipe.set_progress_bar_config(disable=True)
    ad = asyncdiff_rt.AsyncDiff(
        pipe,
        model_n=args.model_n,
        stride=args.stride,
        warm_up=args.warm_up,
        time_shift=args.time_shift,
        plan=args.plan,
        transport=args.transport,
        cfg_parallel=args.cfg_parallel,
        **({"controlnet": args.controlnet_mode} if hasattr(args, "controlnet_mode") else {}),
    )
    try:
        for _ in range(args.warmup_runs):
            pipe(**_call_kwargs(spec, pipe, args, device, inputs))
        kwargs = _call_kwargs(spec, pipe, args, device, inputs)
        synchronize(device)
        start = time.perf_counter()
        out = pipe(**kwargs)
        synchronize(device)
        seconds = time.perf_counter() - start
        if rank == 0:
            model = args.model or f"tiny built-in {spec['kind']} (random weights)"
            print(
                f"{spec['pipeline_class']} [{model}]: {args.steps} steps, model_n={ad.model_n}, stride={ad.stride}, "
                f"warm_up={ad.warm_up}, time_shift={args.time_shift}, cfg_parallel={args.cfg_parallel}, "
                f"{world} rank(s), transport={ad.transport_name}, {device}, {dtype}"
            )
            print(f"latency: {seconds:.3f} s")
            paths = save_output(out, args.out, fps=getattr(args, "fps", 8))
            print(f"saved: {', '.join(os.path.relpath(p) for p in paths)}")
    finally:
        ad.remove()
