"""`asyncdiff-rt` (also `python -m asyncdiff_rt`): demo, generate, plan, bench."""

from __future__ import annotations

import argparse
import os
import sys

from .quiet import quiet_third_party

__all__ = ["main"]

PROG = "asyncdiff-rt"


def _add_async_args(p: argparse.ArgumentParser, model_n: int = 2, warm_up: int = 2) -> None:
    p.add_argument("--model_n", type=int, default=model_n, help="segments (GPUs)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warm_up", type=int, default=warm_up, help="exact steps before the asynchronous ones")
    p.add_argument("--transport", default="auto", choices=("auto", "nccl", "ipc", "shm", "gloo", "local"))


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
    from .plan_cmd import describe_cost_model, make_plan

    plan = make_plan(args)
    print(format_plan_table(plan))
    print(describe_cost_model(plan))
    if args.save:
        plan.save(args.save)
        print(f"saved {args.save}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    generate(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; errors we raise on purpose print one line `asyncdiff-rt: error: ...` and return 2 (with
    --debug anywhere on the line, or ASYNCDIFF_RT_TRACEBACK=1, they raise with their traceback instead)."""
    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ASYNCDIFF_RT_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except Exception as err:
        if debug:
            raise
        return _report(err)


def _report(err: Exception) -> int:
    from .launch import WorkerError
    from .user_errors import is_user_error, worker_is_user_error, worker_message

    if isinstance(err, WorkerError):
        if worker_is_user_error(err):
            print(f"{PROG}: error: {worker_message(err)}", file=sys.stderr)
            return 2
        # a bug in a worker: its traceback, once (not once per rank)
        print(f"{PROG}: error: {worker_message(err, traceback=True)}", file=sys.stderr)
        return 1
    if is_user_error(err):
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    raise err


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error (also after a command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="built-in tiny pipeline: sequential vs asynchronous (no downloads)")
    _add_async_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="demo_out", help="folder for the PNG images: sequential, asynchronous and the timeline"
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("generate", help="generate with a real model under torchrun")
    p.add_argument("--model", required=True, help="a local diffusers folder or a model id")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="auto: float16 on CUDA, float32 on a CPU (float16 is slow or unsupported there)",
    )
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
    p.add_argument(
        "--cost",
        default="auto",
        choices=("auto", "measured", "flops"),
        help="block cost model: measured (time every block on the device: needs the weights in memory, slow on a "
        "CPU), flops (count FLOPs on the meta device: seconds, no memory), auto (measured on CUDA, else flops)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timings per block (measured): 20 on CUDA, 3 on a CPU")
    p.add_argument(
        "--balance",
        default="time",
        choices=("time", "memory"),
        help="what the partition evens out: time (the slowest segment) or memory (the heaviest segment's weights)",
    )
    p.add_argument("--save", default=None, help="write the plan as JSON (reusable with plan=)")
    p.set_defaults(func=_plan)

    sub.add_parser("bench", help="latency benchmark: asyncdiff-rt bench --help (see benchmarks/README.md)")

    if argv[:1] == ["bench"]:  # the benchmark owns its arguments (asyncdiff_rt/bench.py)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
