"""`asyncdiff-rt bench` / `python benchmarks/latency.py`: the denoising loop's latency on the real architectures.

One model per invocation (each fits a device call); results are merged into
`<out>/latency_<model>_<device>.json` (resumable: variants already measured are skipped unless --force), with a
markdown table and a PNG chart beside it. Every figure is a median of --runs timed runs after one warm run, with
min/max and peak GPU memory; ratios are taken within one run of this script.

Variants:
  eager              diffusers as the user runs it
  graph_floor        the same denoiser replayed as a plain CUDA graph, no runtime (the floor for model_n=1)
  compile_default    diffusers with torch.compile(unet) default mode (compile time separately)
  compile_ro         ... mode="reduce-overhead"
  ours_n1            asyncdiff_rt model_n=1 (exact; CUDA graphs)
  ours_n1_compile    ... with compile=True
  ours_shm2/ours_shm3  asyncdiff_rt model_n=2/3 as 2/3 processes on ONE GPU over shm (the runtime's overhead:
                     segments share one GPU, so this is not a speed-up)

Each model runs in its own dtype (bf16 for FLUX.1, fp16 for the others) and, by default, its model card's step
count (FLUX.1-dev 28, the others 50). --model tiny:<kind> (e.g. tiny:flux) runs the same code paths with a tiny
pipeline, also on a CPU (eager, ours_n1; CUDA-graph variants need CUDA): a check of the bench, not a figure.

--emulate N (2, 3 or 4): N smaller GPUs emulated on ONE GPU under CUDA MPS (an MPS daemon of its own, every
process at 100/N % of the SMs): one, control, segments n=N at W=1 and 3, stride 2, CFG parallel (models that run
CFG); results in <out>/emulated_<model>_<device>.{json,md} (tools/emulate.py, benchmarks/README.md). --model may
then also be a tiny pipeline (tiny:sd15, ...). With --strategy patch: PatchParallel (P = N) in every sync mode at
--size px, against one and the control (--compare: also segments and CFG);
<out>/emulated_patch_<model>_<size>_<device>.* (tools/emulate_patch.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any

import torch

from .bench_report import chart, markdown
from .bench_setup import TINY, bench_pipeline, check_model, model_dtype, model_runs_cfg, model_steps, tiny_kind

__all__ = ["main", "setup_single", "run_variant", "VARIANTS"]

VARIANTS = (
    "eager",
    "graph_floor",
    "compile_default",
    "compile_ro",
    "ours_n1",
    "ours_n1_compile",
    "ours_shm2",
    "ours_shm3",
)


# what a CPU cannot run: plain CUDA graphs (the floor, and reduce-overhead's cudagraph trees)
CUDA_ONLY = ("graph_floor", "compile_ro")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _latents(out: Any) -> torch.Tensor:
    return out.images if hasattr(out, "images") else out[0]


def _seeded(kwargs: dict) -> dict:
    """Every call starts from the same noise, so any variant's last latents compare with one eager call's."""
    return {**kwargs, "generator": torch.Generator("cpu").manual_seed(0)}


def _time_loop(pipe: Any, kwargs: dict, runs: int) -> dict[str, Any]:
    """One warm run (its time reported as first_call_s: capture/compile), then `runs` timed runs."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    latents = _latents(pipe(**_seeded(kwargs)))
    _sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        _sync()
        t0 = time.perf_counter()
        latents = _latents(pipe(**_seeded(kwargs)))
        _sync()
        times.append(time.perf_counter() - t0)
    return {
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "latents": latents.float().cpu(),
    }


def _graph_floor(pipe: Any) -> None:
    """Replace the denoiser's forward by a plain CUDA-graph replay per call signature (no runtime)."""
    from ..models.denoiser import find_denoiser
    from ..runtime.executor import CapturedCall, signature_of

    _, den = find_denoiser(pipe)
    original, graphs = den.forward, {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = signature_of((args, kwargs))
        if key not in graphs:
            graphs[key] = CapturedCall(original, args, kwargs)
        out = graphs[key](args, kwargs)
        return (out[0].clone(),) if isinstance(out, tuple) else type(out)(sample=out[0].clone())

    den.forward = forward


def _decode_ms(pipe: Any, latents: torch.Tensor, kwargs: dict) -> float:
    """One image's VAE decode, timed after one untimed decode; the latents as the pipeline would decode them."""
    vae = pipe.vae
    z = latents[:1].to(device=vae.device, dtype=vae.dtype)
    if z.ndim == 3 and hasattr(pipe, "_unpack_latents"):  # FLUX: 2x2-packed tokens (batch, tokens, 64)
        z = pipe._unpack_latents(z, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)
    z = z / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    with torch.no_grad():
        vae.decode(z)
        _sync()
        t0 = time.perf_counter()
        vae.decode(z)
        _sync()
    return (time.perf_counter() - t0) * 1000


def parse_multi(variant: str) -> dict[str, Any] | None:
    """`ours_shm2` / `ours_shm3`: model_n processes on ONE GPU over shm; `ours_n{N}s{S}w{W}`: model_n=N, stride S,
    warm_up W, one process per GPU over nccl (N + S - 1 GPUs)."""
    m = re.fullmatch(r"ours_shm(\d)", variant)
    if m:
        return dict(model_n=int(m[1]), stride=1, warm_up=1, transport="shm", one_gpu=True)
    m = re.fullmatch(r"ours_n(\d)s([12])w(\d+)", variant)
    if m:
        return dict(model_n=int(m[1]), stride=int(m[2]), warm_up=int(m[3]), transport="nccl", one_gpu=False)
    return None


def _multi_worker(rank: int, world: int, model: str, steps: int, runs: int, cfg: dict) -> dict:
    import asyncdiff_rt

    device = 0 if cfg["one_gpu"] else rank
    torch.cuda.set_device(device)
    pipe, call = bench_pipeline(model, f"cuda:{device}", steps)
    ad = asyncdiff_rt.AsyncDiff(
        pipe,
        model_n=cfg["model_n"],
        stride=cfg["stride"],
        warm_up=cfg["warm_up"],
        transport=cfg["transport"],
        timeout_s=600,
    )
    kwargs = {**call, "generator": torch.Generator("cpu").manual_seed(0)}
    result = _time_loop(pipe, kwargs, runs)
    if cfg.get("timeline"):  # one more call, recorded: compute and exposed communication per rank
        ad.record_timeline()
        pipe(**_seeded(kwargs))
        result["timeline"] = ad.gather_timeline()
    result["plan"] = ad.plan.to_dict()
    result["param_gib_rank"] = ad.parameter_bytes() / 2**30
    result["dropped_gib_rank"] = ad.dropped_bytes / 2**30
    ad.remove()
    if rank == 0:
        return result
    return {k: result[k] for k in ("param_gib_rank", "dropped_gib_rank", "peak_mem_gib")}


def _free() -> None:
    """The previous variant's pipeline may sit in a reference cycle (forward overrides), and compiled code holds
    its modules: free both, or its weights count in the next variant's peak memory (FLUX.1: 22 GiB each)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def setup_single(
    model: str, variant: str, steps: int, device: str | None = None, fresh: bool = True
) -> tuple[Any, dict]:
    """The pipeline of a one-process variant, prepared as the variant says, and its call's keyword arguments.
    `fresh`: free the previous variant's pipeline and compiled code first (False: keep them, to run side by side)."""
    import asyncdiff_rt

    from ..models.denoiser import find_denoiser

    if variant not in VARIANTS or parse_multi(variant) is not None:
        raise ValueError(f"{variant!r} is not a one-process variant ({', '.join(VARIANTS[:6])})")
    if fresh:
        _free()
    pipe, call = bench_pipeline(model, device or _device(), steps)
    kwargs = {**call, "generator": torch.Generator("cpu").manual_seed(0)}
    _, den = find_denoiser(pipe)  # pipe.unet or pipe.transformer (SD3, SD3.5, FLUX.1)
    if variant == "graph_floor":
        _graph_floor(pipe)
    elif variant.startswith("compile_"):
        den.compile(mode="reduce-overhead" if variant == "compile_ro" else None)
    elif variant.startswith("ours_n1"):
        asyncdiff_rt.AsyncDiff(pipe, model_n=1, warm_up=1, compile=variant.endswith("compile"))
    return pipe, kwargs


def run_variant(model: str, variant: str, steps: int, runs: int) -> dict[str, Any]:
    from asyncdiff_rt.tools.launch import spawn

    multi = parse_multi(variant)
    if multi is not None:
        world = multi["model_n"] + multi["stride"] - 1
        if not multi["one_gpu"] and torch.cuda.device_count() < world:
            raise RuntimeError(f"{variant} needs {world} GPUs, this machine has {torch.cuda.device_count()}")
        results = spawn(_multi_worker, world, model, steps, runs, multi, timeout_s=900)
        res = results[0]
        res.update(multi)
        res["param_gib_per_rank"] = [r["param_gib_rank"] for r in results]
        res["peak_mem_gib_per_rank"] = [r["peak_mem_gib"] for r in results]
        return res
    if variant in CUDA_ONLY and not torch.cuda.is_available():
        raise RuntimeError(f"{variant} needs CUDA (CUDA graphs); on a CPU run eager, ours_n1")
    pipe, kwargs = setup_single(model, variant, steps)
    res = _time_loop(pipe, kwargs, runs)
    if variant == "eager":
        res["vae_decode_ms"] = _decode_ms(pipe, res["latents"], kwargs)
    del pipe, kwargs
    _free()
    return res


# one-process variants whose latents are compared with diffusers eager (same noise, same dtype)
COMPARED = ("graph_floor", "compile_default", "compile_ro", "ours_n1", "ours_n1_compile")


def _eager_reference(model: str, steps: int, path: str) -> torch.Tensor:
    """The eager latents of this machine's last eager run, or of one untimed eager call made now."""
    if os.path.exists(path):
        return torch.load(path)
    pipe, kwargs = setup_single(model, "eager", steps)
    latents = _latents(pipe(**_seeded(kwargs))).float().cpu()
    del pipe
    _free()
    torch.save(latents, path)
    return latents


def main(argv: list[str] | None = None) -> int:
    import diffusers

    from .archs import ARCHS

    p = argparse.ArgumentParser(
        prog="asyncdiff-rt bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help=f"{', '.join(ARCHS)}, or tiny:<kind> (a check of the bench)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="several GPUs: measure n2s1..n{N}s1 and n2s2..n{N-1}s2 at warm_up 1, 3, 9 (plus eager and ours_n1)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: the model's (FLUX.1-dev 28, the others 50; --strategy patch: 20)",
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per variant (default 5; --emulate: 3)")
    p.add_argument("--emulate", type=int, default=None, choices=(2, 3, 4), help="N GPUs emulated on one under MPS")
    p.add_argument("--emulate_timeout", type=float, default=300.0, help="seconds per emulated variant")
    p.add_argument("--strategy", choices=("segments", "patch"), default="segments", help="with --emulate")
    p.add_argument(
        "--transport",
        default="ipc",
        help="with --emulate: the multi-process variants' transport (ipc: device memory, shm: through host memory); "
        "a comma list runs the segments variants once per transport (ipc,shm: both side by side)",
    )
    p.add_argument("--only", default=None, help="with --emulate: a comma list of variant names to run")
    p.add_argument("--size", type=int, default=None, help="--strategy patch: height and width in pixels")
    p.add_argument("--warm_up", type=int, default=5, help="--strategy patch: PatchParallel's warm_up")
    p.add_argument("--compare", action="store_true", help="--strategy patch: also the segments and CFG variants")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--force", action="store_true", help="measure variants already in the results file again")
    p.add_argument(
        "--timeline",
        default=None,
        metavar="PNG",
        help="draw per rank the compute and exposed-communication spans of one call (of --timeline_variant)",
    )
    p.add_argument("--timeline_variant", default="ours_shm2", help="a multi-process variant, e.g. ours_n4s1w3")
    p.add_argument("--timeline_steps", type=int, default=12)
    args = p.parse_args(argv)
    if args.strategy == "patch" and not args.emulate:
        p.error("--strategy patch is measured with --emulate N")
    if args.model not in ARCHS and not args.model.startswith(TINY):
        p.error(f"--model {args.model!r}: one of {', '.join(ARCHS)} or tiny:<kind>")
    if args.steps is None:
        args.steps = 20 if args.strategy == "patch" else model_steps(args.model)
    if args.emulate:  # before anything touches CUDA here: every GPU process must be an MPS client
        return _emulate(p, args)
    try:
        check_model(args.model)
    except ValueError as err:
        p.error(str(err))
    args.runs = 5 if args.runs is None else args.runs
    if not torch.cuda.is_available() and tiny_kind(args.model) is None:
        raise SystemExit("bench measures GPU latency: no CUDA device here (tiny:<kind> runs on a CPU)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    safe_model = args.model.replace(":", "_")
    stem = os.path.join(args.out, f"latency_{safe_model}_{device.replace(' ', '_')}")
    data = {"meta": {}, "variants": {}}
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            data = json.load(f)
        if data.get("variants") and data.get("meta", {}).get("steps") not in (None, args.steps):
            raise SystemExit(
                f"{stem}.json holds a {data['meta']['steps']}-step run: pass --steps {data['meta']['steps']} to add "
                "to it, or another --out"
            )
    data["meta"] = {
        "model": args.model,
        "size": _size(args.model),
        "dtype": str(model_dtype(args.model, _device())).replace("torch.", ""),
        "batch": 2 if model_runs_cfg(args.model) else 1,
        "cfg": model_runs_cfg(args.model),
        "steps": args.steps,
        "runs": args.runs,
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if args.nproc:
        several = [f"ours_n{n}s1w{w}" for n in range(2, args.nproc + 1) for w in (1, 3, 9)]
        several += [f"ours_n{n}s2w{w}" for n in range(2, args.nproc) for w in (1, 3, 9)]
        args.variants = ",".join(["eager", "ours_n1", *several])
    eager_latents = None
    # the eager run's latents, to compare the other variants against (kept out of the results folder)
    latents_path = os.path.join(
        tempfile.gettempdir(), f"asyncdiff_rt_{os.path.basename(stem)}_{args.steps}steps_eager.pt"
    )
    for variant in [v for v in args.variants.split(",") if v]:
        if variant in data["variants"] and "error" not in data["variants"][variant] and not args.force:
            print(f"{variant}: already measured, skipped (--force to redo)")
            continue
        print(f"{variant}: running", flush=True)
        try:
            res = run_variant(args.model, variant, args.steps, args.runs)
        except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others still run
            import traceback

            traceback.print_exc()
            data["variants"][variant] = {"error": f"{type(err).__name__}: {err}"}
            continue
        latents = res.pop("latents")
        if variant == "eager":
            eager_latents = latents
            torch.save(latents, latents_path)
        elif variant in COMPARED and eager_latents is None:
            eager_latents = _eager_reference(args.model, args.steps, latents_path)
        if variant in COMPARED:
            res["max_abs_vs_eager"] = float((latents - eager_latents).abs().max())
        data["variants"][variant] = res
        print(f"{variant}: median {res['median_s']:.3f} s", flush=True)
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=2)
    if args.timeline:
        from ..runtime.timeline import draw_timeline
        from .launch import spawn

        cfg = parse_multi(args.timeline_variant)
        if cfg is None:
            raise SystemExit(f"--timeline_variant {args.timeline_variant!r} is not a multi-process variant")
        world = cfg["model_n"] + cfg["stride"] - 1
        res = spawn(_multi_worker, world, args.model, args.timeline_steps, 1, {**cfg, "timeline": True}, timeout_s=900)
        draw_timeline(res[0]["timeline"], args.timeline, f"{args.model} {args.timeline_variant} on {device}")
        print(f"timeline: {args.timeline}")
    if not data["variants"]:
        return 0
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(data, VARIANTS))
    chart(data, stem + ".png", VARIANTS)
    print(markdown(data, VARIANTS))
    return 0


def _size(model: str) -> int:
    from .archs import ARCHS

    kind = tiny_kind(model)
    if kind is None:
        return ARCHS[model]["size"]
    from ..tiny import call_kwargs

    return call_kwargs(kind)["height"]


def _emulate(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .emulate import run_emulation
    from .mps import MpsError

    # a tiny kind is checked in the first child (importing the tiny pipelines here could start CUDA here)
    transports = tuple(t for t in args.transport.split(",") if t)
    bad = [t for t in transports if t not in ("ipc", "shm", "nccl", "gloo")]
    if bad or not transports:
        p.error(f"--transport {args.transport!r}: a comma list of ipc, shm (nccl, gloo: not on one GPU)")
    only = [v for v in args.only.split(",") if v] if args.only else None
    try:
        if args.strategy == "patch":
            from .emulate_patch import run_patch_emulation

            size = args.size or _size(args.model)
            run_patch_emulation(args.model, args.emulate, size, args.steps, 1 if args.runs is None else args.runs,
                                args.out, timeout_s=args.emulate_timeout, compare=args.compare, only=only,
                                warm_up=args.warm_up, force=args.force, transport=transports[0])  # fmt: skip
            return 0
        run_emulation(args.model, args.emulate, args.steps, 3 if args.runs is None else args.runs, args.out,
                      timeout_s=args.emulate_timeout, only=only, transports=transports)  # fmt: skip
    except MpsError as err:
        raise SystemExit(f"bench --emulate: {err}") from err
    return 0
