"""`asyncdiff-rt` (also `python -m asyncdiff_rt`): demo, generate, plan, bench."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _add_async_args(p: argparse.ArgumentParser, model_n: int = 2, warm_up: int = 2) -> None:
    p.add_argument("--model_n", type=int, default=model_n, help="segments (GPUs)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warm_up", type=int, default=warm_up, help="exact steps before the asynchronous ones")
    p.add_argument("--transport", default="auto", choices=("auto", "nccl", "shm", "gloo", "local"))


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            model_n=args.model_n,
            stride=args.stride,
            warm_up=args.warm_up,
            steps=args.steps,
            seed=args.seed,
            transport=args.transport,
            out=args.out,
        )
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ..compiler.plan_table import format_plan_table
    from ..compiler.planning import plan_for
    from .loading import load_pipeline_for_planning

    pipe = load_pipeline_for_planning(args.model, dtype=args.dtype, device=args.device)
    plan = plan_for(pipe, args.model_n, height=args.height, width=args.width, granularity=args.granularity)
    print(format_plan_table(plan))
    if args.save:
        plan.save(args.save)
        print(f"saved {args.save}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    generate(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncdiff-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="built-in tiny pipeline: sequential vs asynchronous (no downloads)")
    _add_async_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="folder for the two PNG images")
    p.set_defaults(func=_demo)

    p = sub.add_parser("generate", help="generate with a real model under torchrun")
    p.add_argument("--model", required=True, help="a local diffusers folder or a model id")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--plan", default=None, help="a saved plan (JSON) to use instead of planning")
    p.add_argument("--out", default="output.png")
    _add_async_args(p, model_n=2, warm_up=3)
    p.set_defaults(func=_generate)

    p = sub.add_parser("plan", help="the partition table for a model, resolution and model_n")
    p.add_argument(
        "--model",
        required=True,
        help="a local diffusers folder, or a built-in architecture: "
        "sd15, sd21, sdxl, sd3 (random weights) or a tiny kind (tiny:sd15, ...)",
    )
    p.add_argument("--model_n", type=int, default=2)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on CPU by default")
    p.add_argument("--device", default=None)
    p.add_argument("--granularity", default="fine", choices=("fine", "coarse"))
    p.add_argument("--save", default=None, help="write the plan as JSON (reusable with plan=)")
    p.set_defaults(func=_plan)

    sub.add_parser("bench", help="latency benchmark: asyncdiff-rt bench --help (see benchmarks/README.md)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark owns its arguments (asyncdiff_rt/bench.py)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
