"""`asyncdiff-rt bench --model M --emulate N`: N smaller GPUs emulated on ONE GPU with CUDA MPS.

An MPS daemon of our own runs for the whole invocation (tools/mps.py); every GPU process is a child started after it
with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100/N, so N processes side by side behave like N GPUs of 1/N of the SMs
sharing one HBM, joined by the transport of the run (`ipc`: device memory; `shm`: through host memory). This
process never initialises CUDA. Variants (`variants_for`): `one` (ours_n1 alone), `control` (N ours_n1 side by
side: what the sharing itself costs), the segments variants and, where N fits and the model runs CFG, CFG
parallelism (FLUX.1 is guidance-distilled: its CFG variants are skipped with a note). benchmarks/README.md
("emulated") says what this models and what it does not, and what it costs in memory; the report is
emulate_report.py's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch

from .bench_setup import bench_pipeline, model_dtype, model_runs_cfg
from .emulate_report import breakdown, markdown, summarize
from .mps import MpsDaemon, percentage

__all__ = ["variants_for", "cfg_skipped", "run_emulation", "EMULATE_NS", "result_stem"]

EMULATE_NS = (2, 3, 4)


def variants_for(n: int, cfg: bool = True) -> list[dict[str, Any]]:
    """What `--emulate n` measures, in order: name, what it is, model_n, stride, warm_up, cfg_parallel, processes.
    cfg=False (a model whose call has no CFG batch, FLUX.1): without the CFG-parallel variants."""
    if n not in EMULATE_NS:
        raise ValueError(f"--emulate takes one of {', '.join(map(str, EMULATE_NS))}, got {n!r}")

    def v(name, what, model_n, stride=1, warm_up=1, cfg=False, procs=None):
        procs = procs or (2 if cfg else 1) * (model_n + stride - 1)
        return dict(name=name, what=what, model_n=model_n, stride=stride, warm_up=warm_up, cfg_parallel=cfg,
                    procs=procs, independent=model_n == 1 and not cfg)  # fmt: skip

    out = [
        v("one", "ours_n1 (model_n=1) alone", 1),
        v("control", f"{n} independent ours_n1 side by side", 1, procs=n),
        v(f"ours_n{n}s1w1", f"segments model_n={n}, stride 1, W=1", n),
        v(f"ours_n{n}s1w3", f"segments model_n={n}, stride 1, W=3", n, warm_up=3),
    ]
    if n >= 3:
        out.append(v(f"ours_n{n - 1}s2w1", f"segments model_n={n - 1}, stride 2, W=1", n - 1, stride=2))
    if n == 2:
        out.append(v("cfg2", "cfg_parallel, model_n=1 (one guidance half per process)", 1, cfg=True))
    if n == 4:
        out.append(v("cfg2_n2", "cfg_parallel, model_n=2 per guidance half", 2, cfg=True))
    for spec in out:
        assert spec["procs"] <= n, spec
    return [s for s in out if cfg or not s["cfg_parallel"]]


def cfg_skipped(model: str, n: int) -> dict[str, str]:
    """The CFG-parallel variants `model` cannot run, each with the reason (empty when it runs CFG)."""
    if model_runs_cfg(model):
        return {}
    return {
        s["name"]: f"skipped: {model} runs no classifier-free guidance (guidance-distilled: no CFG batch to split)"
        for s in variants_for(n)
        if s["cfg_parallel"]
    }


def over_transports(specs: list[dict[str, Any]], transports: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each multi-process variant once per transport: over the first under its own name, over the others as
    `<name>_<transport>`, right after it (so a table compares them side by side)."""
    out = []
    for spec in specs:
        out.append({**spec, "transport": transports[0]})
        if not spec["independent"]:
            out += [{**spec, "name": f"{spec['name']}_{t}", "what": f"{spec['what']}, over {t}", "transport": t}
                    for t in transports[1:]]  # fmt: skip
    return out


def result_stem(out: str, model: str, device: str) -> str:
    """benchmarks/results/emulated_<model>_<device> (device as the other result files spell it)."""
    safe_model = model.replace(":", "_").replace("/", "_")
    return os.path.join(out, f"emulated_{safe_model}_{device.replace(' ', '_').replace('/', '_')}")


# ---------------------------------------------------------------------------------------------- child processes
def _check_client(spec: dict) -> None:
    """Fail fast in a child that would not be a limited MPS client (before anything touches CUDA)."""
    if spec["device"] != "cuda":
        return
    missing = [k for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"emulation child started without {', '.join(missing)}: it would not be a limited MPS client"
        )
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in an emulation child before its MPS environment was read")
    try:
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
    except Exception as err:
        raise RuntimeError(
            f"CUDA did not start as an MPS client ({type(err).__name__}: {err}): see the MPS logs in "
            f"{os.environ.get('CUDA_MPS_LOG_DIRECTORY')}; another MPS daemon may own the GPU"
        ) from err


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_info(rank: int, world: int, spec: dict) -> dict[str, Any]:
    from importlib.metadata import version

    if spec["model"].startswith("tiny:"):
        from asyncdiff_rt.tiny import KINDS

        if spec["model"].split(":", 1)[1] not in KINDS:
            raise ValueError(f"--model {spec['model']!r}: tiny kinds are {', '.join(f'tiny:{k}' for k in KINDS)}")
    _check_client(spec)
    name = torch.cuda.get_device_name(0) if spec["device"] == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "diffusers": version("diffusers")}


def loop_times(times: list[float], first: float) -> dict[str, Any]:
    """A variant's timed calls on one process: every time, median, min, max, and the untimed first call."""
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "first_call_s": first}  # fmt: skip


def attach_segments(pipe: Any, spec: dict) -> Any:
    """AsyncDiff as a segments variant asks (the control's processes: each alone, `local`)."""
    import asyncdiff_rt
    from asyncdiff_rt.compiler.plan import Plan

    return asyncdiff_rt.AsyncDiff(
        pipe,
        model_n=spec["model_n"],
        stride=spec["stride"],
        warm_up=spec["warm_up"],
        transport="local" if spec["independent"] else spec["transport"],
        cfg_parallel=spec["cfg_parallel"],
        plan=Plan.from_json(spec["plan"]) if spec.get("plan") else None,
        timeout_s=spec["timeout_s"],
    )


def _worker(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """One process of one variant: build the pipeline once, one untimed warm-up call, `runs` timed calls (all
    processes start each together, behind a barrier), one recorded call for the timeline."""
    _check_client(spec)
    import torch.distributed as dist

    device = "cuda:0" if spec["device"] == "cuda" else "cpu"
    # built on the device in its own dtype (FLUX.1: 22.2 GiB of bf16; never a float32 copy, which four processes
    # building at once could not hold); non-owned blocks are freed by AsyncDiff below
    pipe, kwargs = bench_pipeline(spec["model"], device, spec["steps"])
    if spec["independent"] and world > 1:  # control: the processes only share a barrier
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    ad = attach_segments(pipe, spec)
    barrier = dist.barrier if world > 1 else (lambda: None)
    loud = rank == 0 or spec["independent"]

    def call() -> float:
        barrier()
        _sync(spec["device"])
        t0 = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))
        _sync(spec["device"])
        return time.perf_counter() - t0

    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = call()
    if loud:
        print(f"  {spec['name']} process {rank}: warm-up call {first:.3f} s", flush=True)
    times = []
    for i in range(spec["runs"]):
        times.append(call())
        if loud:
            print(f"  {spec['name']} process {rank}: run {i + 1}/{spec['runs']} {times[-1]:.3f} s", flush=True)
    ad.record_timeline()
    call()
    spans = ad.gather_timeline()  # every rank of this variant (independent processes: their own)
    ad.record_timeline(False)
    last = len(spans) - 1
    result = {
        **loop_times(times, first),
        "split_quality": ad.plan.split_quality(),
        "plan": ad.plan.to_json(indent=None) if rank == 0 else None,
        "size": kwargs.get("height"),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if spec["device"] == "cuda" else None,
        # every rank's (the table shows rank 0 and the last; the note, every rank's compute against the plan's)
        "breakdown": {f"rank {i}": breakdown(spans[i]) for i in range(last + 1)}
        if not spec["independent"]
        else {"rank 0": breakdown(spans[0])},
        "segment_ms": [seg.cost_ms for seg in ad.plan.segments],
    }
    ad.remove()
    return result


# ---------------------------------------------------------------------------------------------- the driver
@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """The children's variables in this process's environment while they start (spawn copies it at birth, before
    a child imports anything); this process itself never initialises CUDA."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawn(fn: Any, procs: int, spec: dict, env: dict, timeout_s: float) -> list[Any]:
    from .launch import spawn

    with _environ(env):
        return spawn(fn, procs, spec, timeout_s=timeout_s, env=env)


def _collect(spec: dict, per_proc: list[dict]) -> dict[str, Any]:
    """A variant's row: rank 0's times (every rank of one variant ends its loop together); control: each
    process's median and their mean."""
    res = {k: spec[k] for k in ("what", "model_n", "stride", "warm_up", "cfg_parallel", "procs")}
    first = per_proc[0]
    res.update({k: first[k] for k in ("times_s", "median_s", "min_s", "max_s", "first_call_s", "peak_mem_gib")})
    res["split_quality"] = first["split_quality"]
    res["segment_ms"] = first.get("segment_ms")
    res["breakdown"] = first["breakdown"]
    if spec["name"] == "control":
        res["medians_s"] = [p["median_s"] for p in per_proc]
        res["mean_s"] = statistics.mean(res["medians_s"])
    return res


def load_results(path: str) -> dict[str, Any]:
    """An emulation results file (its `emulations` entries are replaced one n at a time), or an empty one."""
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("emulations"), dict):
            return data
    return {"meta": {}, "emulations": {}}


def write_results(stem: str, data: dict[str, Any], render: Any = None) -> None:
    """`<stem>.json` and `<stem>.md` (the table `render` makes of the data; default: this emulation's)."""
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write((render or markdown)(data))


def run_emulation(
    model: str,
    n: int,
    steps: int = 50,
    runs: int = 3,
    out: str = "benchmarks/results",
    timeout_s: float = 300.0,
    device: str = "cuda",
    daemon: Any = None,
    only: list[str] | None = None,
    transports: tuple[str, ...] = ("shm",),
) -> dict[str, Any]:
    """Measure every variant of `variants_for(n)` (or those named in `only`) and write
    `<out>/emulated_<model>_<device>.{json,md}`; the `n` entry of an existing file is replaced. `device="cpu"`
    (tests) runs the same orchestration on CPU processes; `daemon` is an MpsDaemon (or a stand-in). The
    multi-process variants exchange over `transports[0]`, and run again over each further one (named `_<kind>`)."""
    skipped = {k: v for k, v in cfg_skipped(model, n).items() if only is None or k in only}
    specs = over_transports(variants_for(n, cfg=not skipped), transports)
    specs = [s for s in specs if only is None or s["name"] in only]
    if device == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError("run_emulation must run in a process that has not initialised CUDA (MPS clients only)")
    daemon = MpsDaemon() if daemon is None else daemon
    pct = percentage(n)
    base = dict(model=model, steps=steps, runs=runs, device=device, timeout_s=timeout_s)
    with daemon:
        env = daemon.client_env(n) if device == "cuda" else {}
        print(f"emulate {n}: MPS daemon up (pipe {getattr(daemon, 'pipe_dir', '-')}), {pct} % of the SMs per process",
              flush=True)  # fmt: skip
        info = _spawn(_device_info, 1, {**base, "name": "device"}, env, timeout_s=min(timeout_s, 60))[0]
        servers = daemon.server_list() if hasattr(daemon, "server_list") else ""
        print(f"emulate {n}: {info['device']}, MPS servers after the first client: {servers or '(none)'}", flush=True)
        os.makedirs(out, exist_ok=True)
        stem = result_stem(out, model, info["device"])
        data = load_results(stem + ".json")
        data["meta"] = {"model": model, **info, "transport": transports[0]}
        entry = {
            "n": n,
            "percent": pct,
            "transport": transports[0],
            "steps": steps,
            "runs": runs,
            "date": datetime.date.today().isoformat(),
            "mps_pipe_dir": getattr(daemon, "pipe_dir", None),
            "mps_server_list": servers,
            "dtype": str(model_dtype(model, device)).replace("torch.", ""),
            "skipped": skipped,
            "variants": {},
        }
        for name, note in skipped.items():
            print(f"emulate {n}: {name}: {note}", flush=True)
        data["emulations"][str(n)] = entry
        plans: dict[int, str] = {}  # one plan per model_n (without CFG) for every W: the variants compare alike
        for spec in specs:
            name = spec["name"]
            print(f"emulate {n}: {name} ({spec['what']}, {spec['procs']} process(es) at {pct} %): starting",
                  flush=True)  # fmt: skip
            plan = plans.get(spec["model_n"]) if spec["model_n"] > 1 and not spec["cfg_parallel"] else None
            t0 = time.perf_counter()
            try:
                per_proc = _spawn(_worker, spec["procs"], {**base, **spec, "plan": plan}, env, timeout_s)
            except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others still run
                print(f"emulate {n}: {name} FAILED: {err}", flush=True)
                entry["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}", "what": spec["what"]}
                write_results(stem, summarize(data))
                continue
            if spec["model_n"] > 1 and not spec["cfg_parallel"] and per_proc[0]["plan"]:
                plans.setdefault(spec["model_n"], per_proc[0]["plan"])
            entry["size"] = entry.get("size") or per_proc[0]["size"]
            entry["variants"][name] = _collect(spec, per_proc)
            row = entry["variants"][name]
            shown = row.get("mean_s", row["median_s"])
            print(f"emulate {n}: {name}: median {shown:.3f} s ({time.perf_counter() - t0:.0f} s with set-up)",
                  flush=True)  # fmt: skip
            write_results(stem, summarize(data))
    write_results(stem, summarize(data))
    print(markdown(data), flush=True)
    print(f"written: {stem}.json, {stem}.md", flush=True)
    return data
