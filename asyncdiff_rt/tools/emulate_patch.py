"""`asyncdiff-rt bench --model M --emulate N --strategy patch --size PX`: PatchParallel on N GPUs emulated on ONE.

The same emulation as tools/emulate.py (an MPS daemon of our own, every process a client at 100/N % of the SMs,
`shm` between them; this process never initialises CUDA), with the variants of displaced patch parallelism at one
size: `one` (ours_n1 alone), `control` (N ours_n1 side by side), `patch_<mode>` (PatchParallel, P = N, for every
sync mode of strategies/patches/modes.py, `naive` included) and, with `compare`, the segments and CFG variants of
`bench --emulate N` at the same size (the "segments vs patches vs CFG" table). Every variant is a fresh set of
processes: a short untimed call (captures the graphs), then `runs` timed calls behind a barrier, each step's end
marked (CUDA events, no host sync) for the steady per-step time. Rank 0's last latents are compared with `one`'s
(PSNR); each rank reports the bytes it sends per step. Results go to
`<out>/emulated_patch_<model>_<size>_<device>.{json,md}` after every variant; a rerun with the same settings
keeps the variants already measured (resumable; `force` measures them again). The report is
emulate_patch_report.py's; benchmarks/README.md ("emulated patch table") says what is counted.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from . import emulate
from .bench_setup import bench_pipeline
from .emulate_patch_report import markdown, summarize
from .mps import MpsDaemon, percentage

__all__ = ["patch_variants", "run_patch_emulation", "patch_stem", "DEFAULT_STEPS", "DEFAULT_WARM_UP"]

DEFAULT_STEPS = 20  # the device budget: 2048 px SDXL steps are ~0.4 s on a whole H200 (benchmarks/README.md)
DEFAULT_WARM_UP = 5  # PatchParallel's default


def patch_variants(n: int, warm_up: int = DEFAULT_WARM_UP, compare: bool = False) -> list[dict[str, Any]]:
    """What `--emulate n --strategy patch` measures, in order (names, what, kind, processes, the runtime's
    arguments). `compare`: also the segments and CFG variants of `emulate.variants_for(n)`."""
    from ..strategies.patches.modes import SYNC_MODES

    segments = emulate.variants_for(n)  # validates n

    def v(name, what, kind, procs, **extra):
        spec = dict(name=name, what=what, kind=kind, procs=procs, model_n=1, stride=1, warm_up=1,
                    cfg_parallel=False, sync_mode=None, independent=False)  # fmt: skip
        spec.update(extra)
        return spec

    out = [
        v("one", "ours_n1 (model_n=1) alone", "segments", 1, independent=True),
        v("control", f"{n} independent ours_n1 side by side", "segments", n, independent=True),
    ]
    for mode in SYNC_MODES:
        out.append(v(f"patch_{mode}", f"PatchParallel P={n}, sync_mode={mode}, W={warm_up}", "patch", n,
                     warm_up=warm_up, sync_mode=mode))  # fmt: skip
    if compare:
        for s in segments:
            if s["name"] not in ("one", "control"):
                keys = ("model_n", "stride", "warm_up", "cfg_parallel")
                out.append(v(s["name"], s["what"], "segments", s["procs"], **{k: s[k] for k in keys}))
    return out


def patch_stem(out: str, model: str, size: int, device: str) -> str:
    """benchmarks/results/emulated_patch_<model>_<size>_<device> (spelt as emulate.result_stem spells them)."""
    safe_model, safe_device = model.replace(":", "_").replace("/", "_"), device.replace(" ", "_").replace("/", "_")
    return os.path.join(out, f"emulated_patch_{safe_model}_{size}_{safe_device}")


# ---------------------------------------------------------------------------------------------- child processes
def _runtime(pipe: Any, spec: dict) -> Any:
    import asyncdiff_rt

    if spec["kind"] == "patch":
        return asyncdiff_rt.PatchParallel(pipe, warm_up=spec["warm_up"], sync_mode=spec["sync_mode"],
                                          transport=spec["transport"], timeout_s=spec["timeout_s"])  # fmt: skip
    return emulate.attach_segments(pipe, spec)


class _StepMarks:
    """The end of every step of one call: CUDA events on the current stream (no host sync) or host times."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self) -> None:
        self.marks = [self._mark()]

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        self.marks.append(self._mark())
        return callback_kwargs

    def steps_ms(self) -> list[float]:
        """Each step's wall time in ms (after the call has been synchronised)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1000 for a, b in pairs]


def steady_step_ms(steps_ms: list[float], warm_up: int) -> float | None:
    """Mean wall time of the steps after the warm-up (a stride-2 round's two steps alike); None without any."""
    steady = steps_ms[warm_up:]
    return statistics.mean(steady) if steady else None


def _worker(rank: int, world: int, spec: dict) -> dict[str, Any]:
    emulate._check_client(spec)
    import torch.distributed as dist

    cuda = spec["device"] == "cuda"
    device = "cuda:0" if cuda else "cpu"
    pipe, kwargs = bench_pipeline(spec["model"], device, spec["steps"], spec["size"])
    if spec["independent"] and world > 1:  # control: the processes only share a barrier
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    rt = _runtime(pipe, spec)
    barrier = dist.barrier if world > 1 else (lambda: None)
    loud = rank == 0 or spec["independent"]
    marks = _StepMarks(cuda)

    def call(steps: int) -> tuple[float, Any]:
        barrier()
        emulate._sync(spec["device"])
        marks.start()
        t0 = time.perf_counter()
        out = pipe(**{**kwargs, "num_inference_steps": steps}, generator=torch.Generator("cpu").manual_seed(0),
                   callback_on_step_end=marks)  # fmt: skip
        emulate._sync(spec["device"])
        return time.perf_counter() - t0, out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # untimed: captures every graph (both step parities after the warm-up) at a fraction of the steps
    first, _ = call(min(spec["steps"], spec["warm_up"] + 4))
    if loud:
        print(f"  {spec['name']} process {rank}: untimed call {first:.2f} s", flush=True)
    times, step_ms = [], []
    for i in range(spec["runs"]):
        t, out = call(spec["steps"])
        times.append(t)
        step_ms.append(steady_step_ms(marks.steps_ms(), spec["warm_up"]))
        if loud:
            print(f"  {spec['name']} process {rank}: run {i + 1}/{spec['runs']} {t:.3f} s", flush=True)
    latents = (out.images if hasattr(out, "images") else out[0]).float().cpu()
    result = {
        **emulate.loop_times(times, first),
        "step_ms": statistics.median(measured) if (measured := [s for s in step_ms if s is not None]) else None,
        "size": kwargs.get("height"),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "latents": latents if rank == 0 else None,
    }
    if spec["kind"] == "patch":
        result["bytes_per_step"] = rt.bytes_per_step()
        result["captures"] = rt.captures
        result["kv_puts"] = rt.exchange.puts
    rt.remove()
    return result


# ---------------------------------------------------------------------------------------------- the driver
def _collect(spec: dict, per_proc: list[dict]) -> dict[str, Any]:
    keys = ("what", "kind", "procs", "model_n", "stride", "warm_up", "cfg_parallel", "sync_mode")
    row = {k: spec[k] for k in keys}
    first = per_proc[0]
    row.update({k: first[k] for k in ("times_s", "median_s", "min_s", "max_s", "first_call_s", "step_ms")})
    row["peak_mem_gib"] = max((p["peak_mem_gib"] or 0.0) for p in per_proc) or None
    if spec["name"] == "control":
        row["medians_s"] = [p["median_s"] for p in per_proc]
        row["mean_s"] = statistics.mean(row["medians_s"])
        steps = [p["step_ms"] for p in per_proc if p["step_ms"] is not None]
        row["step_ms"] = statistics.mean(steps) if steps else None
    if spec["kind"] == "patch":
        row["bytes_per_rank"] = [p["bytes_per_step"] for p in per_proc]
        row["captures"] = [p["captures"] for p in per_proc]
        row["kv_puts"] = [p["kv_puts"] for p in per_proc]
    return row


def _latents_path(stem: str, n: int, name: str) -> str:
    """Final latents kept out of the results folder (the `one` reference survives a resumed run)."""
    where = hashlib.sha1(os.path.abspath(stem).encode()).hexdigest()[:8]  # one results file's, not another's
    return os.path.join(tempfile.gettempdir(), f"asyncdiff_rt_{os.path.basename(stem)}_{where}_n{n}_{name}.pt")


def run_patch_emulation(
    model: str,
    n: int,
    size: int,
    steps: int = DEFAULT_STEPS,
    runs: int = 1,
    out: str = "benchmarks/results",
    timeout_s: float = 300.0,
    device: str = "cuda",
    daemon: Any = None,
    only: list[str] | None = None,
    compare: bool = False,
    warm_up: int = DEFAULT_WARM_UP,
    force: bool = False,
    transport: str = "shm",
) -> dict[str, Any]:
    """Measure `patch_variants(n, warm_up, compare)` (or those named in `only`) at `size` px and write the
    table; variants of a previous run with the same settings are kept unless `force`. `device="cpu"` (tests)
    runs the same orchestration on CPU processes; `daemon` is an MpsDaemon (or a stand-in)."""
    specs = [s for s in patch_variants(n, warm_up, compare) if only is None or s["name"] in only]
    if device == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError("run_patch_emulation must run in a process that has not initialised CUDA (MPS clients)")
    daemon = MpsDaemon() if daemon is None else daemon
    pct = percentage(n)
    base = dict(model=model, steps=steps, runs=runs, device=device, transport=transport, timeout_s=timeout_s, size=size)
    with daemon:
        env = daemon.client_env(n) if device == "cuda" else {}
        print(f"emulate patch {n}: MPS daemon up, {pct} % of the SMs per process, {len(specs)} variants at {size} px, "
              f"{steps} steps, {runs} timed run(s)", flush=True)  # fmt: skip
        info = emulate._spawn(emulate._device_info, 1, {**base, "name": "device"}, env, min(timeout_s, 60))[0]
        os.makedirs(out, exist_ok=True)
        stem = patch_stem(out, model, size, info["device"])
        data = emulate.load_results(stem + ".json")
        data["meta"] = {"model": model, "size": size, **info, "transport": transport}
        settings = {"n": n, "percent": pct, "steps": steps, "runs": runs, "warm_up": warm_up, "size": size}
        old = data["emulations"].get(str(n), {})
        keep = {} if force or any(old.get(k) != v for k, v in settings.items()) else old.get("variants", {})
        entry = {**settings, "date": datetime.date.today().isoformat(), "variants": dict(keep)}
        entry["mps_pipe_dir"] = getattr(daemon, "pipe_dir", None)
        data["emulations"][str(n)] = entry
        started = time.perf_counter()
        for i, spec in enumerate(specs):
            name = spec["name"]
            path = _latents_path(stem, n, name)
            if name in keep and "error" not in keep[name] and os.path.exists(path):
                print(f"emulate patch {n}: {name}: already measured, kept (force to redo)", flush=True)
                continue
            print(f"emulate patch {n}: [{i + 1}/{len(specs)}] {name} ({spec['what']}, {spec['procs']} process(es) "
                  f"at {pct} %): starting", flush=True)  # fmt: skip
            t0 = time.perf_counter()
            try:
                per_proc = emulate._spawn(_worker, spec["procs"], {**base, **spec}, env, timeout_s)
            except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others still run
                print(f"emulate patch {n}: {name} FAILED: {err}", flush=True)
                entry["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}", "what": spec["what"]}
                emulate.write_results(stem, summarize(data), markdown)
                continue
            torch.save(per_proc[0].pop("latents"), path)
            entry["variants"][name] = _collect(spec, per_proc)
            _fidelity(entry, stem, n, name)
            emulate.write_results(stem, summarize(data), markdown)
            row = entry["variants"][name]
            print(f"emulate patch {n}: {name}: median {row.get('mean_s', row['median_s']):.3f} s "
                  f"({time.perf_counter() - t0:.0f} s with set-up, {time.perf_counter() - started:.0f} s so far)",
                  flush=True)  # fmt: skip
    emulate.write_results(stem, summarize(data), markdown)
    print(markdown(data), flush=True)
    print(f"written: {stem}.json, {stem}.md", flush=True)
    return data


def _fidelity(entry: dict, stem: str, n: int, name: str) -> None:
    """PSNR of this variant's final latents against `one`'s (data range: `one`'s), when both are at hand."""
    from .fidelity import compare

    ref_path, path = _latents_path(stem, n, "one"), _latents_path(stem, n, name)
    if not os.path.exists(ref_path):
        return
    ref, got = torch.load(ref_path), torch.load(path)
    f = compare(ref, got)
    entry["variants"][name]["fidelity"] = {"psnr_db": f["psnr_db"], "max_abs": f["max_abs"], "rel": f["rel"]}
