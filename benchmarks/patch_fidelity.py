"""PatchParallel's result at a real architecture and size, per runtime path: P processes on one GPU over `ipc`
(time-sliced; with --mps at once, under an MPS daemon, as in the bench's emulation: this checks values, not speed),
each configuration (sync mode, CUDA graphs, the overlap paths of graphs.OVERLAP_ENV) on the same pipelines, two
calls each (the second replays the graphs the first captured, as the bench's timed call does). Per configuration and
call: whether the latents are finite, their PSNR against the plain pipeline's (exact; random weights: a consistency
check) and their largest difference from the first configuration's (eager, overlap off: the path the simulator
equalities cover on the CPU).

    python benchmarks/patch_fidelity.py --model sdxl --size 2048 --out benchmarks/results
    python benchmarks/patch_fidelity.py --model tiny:sdxl --size 64 --device cpu --steps 4   # a smoke run (gloo)

Writes patch_fidelity_<model>_<size>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncdiff_rt.strategies.patches.graphs import OVERLAP_ENV  # noqa: E402
from asyncdiff_rt.tools.emulate import write_results  # noqa: E402
from asyncdiff_rt.tools.launch import spawn  # noqa: E402

# sync mode / graphs on / overlap paths on / warm_up / transport / K/V path ("buffer", or "stack": the other
# patches' K/V stacked with the own, as at a point's registering step) [/ "sync": the host waits for the GPU after
# every step, "nocb": no step callback at all (else one that records, on the device, whether the latents are
# finite)]; the first is the reference path
DEFAULT_CONFIGS = (
    "corrected_async_gn/0/0/2/ipc/buffer",
    "corrected_async_gn/1/0/2/ipc/buffer",
    "corrected_async_gn/1/1/2/ipc/buffer",
    "stale_gn/1/1/2/ipc/buffer",
)


def parse_config(text: str) -> dict:
    mode, graphs, overlap, warm_up, transport, kv, *watch = text.split("/")
    if watch not in ([], ["sync"], ["nocb"]):
        raise ValueError(f"configuration {text!r}: the optional last field is sync or nocb, got {watch[0]!r}")
    return dict(name=text, mode=mode, graphs=graphs == "1", overlap=overlap == "1", warm_up=int(warm_up),
                transport=transport, kv=kv, watch=watch[0] if watch else "flags")  # fmt: skip


class _FirstNonFinite:
    """callback_on_step_end: each step's "latents all finite", kept on the device (no host synchronisation, which
    would hide a race) unless `sync`; `step` after the call: the first step whose latents are not (None: none)."""

    def __init__(self, sync: bool):
        self.sync, self.flags = sync, []

    def __call__(self, pipe, i, t, kw):
        self.flags.append(torch.isfinite(kw["latents"]).all())
        if self.sync and kw["latents"].is_cuda:
            torch.cuda.synchronize()
        return kw

    @property
    def step(self) -> int | None:
        return next((i for i, ok in enumerate(self.flags) if not bool(ok)), None)


class _GroupNormWatch:
    """Wraps the patch GroupNorm's normalisation (layers._normalise, looked up at call time) to keep, per call, the
    smallest combined variance over the patch's own (per group) and the largest |x - mean| / sqrt(var + eps): a
    combined variance near 0 blows the normalised values up (benchmarks/README.md, patch fidelity). Eager forwards
    only: under graphs the kept values would be captured tensors."""

    def __init__(self):
        from asyncdiff_rt.strategies.patches import layers

        self.layers, self.original, self.kept = layers, layers._normalise, []
        layers._normalise = self._watched

    def _watched(self, x, norm, mean, var):
        own = self.layers._own_var(x, norm.num_groups).to(var.dtype)
        centred = self.layers._widened(x, norm.num_groups).to(mean.dtype) - mean[..., None]
        peak = centred.abs().amax(-1) * torch.rsqrt(var + norm.eps)
        self.kept.append(torch.stack([(var / own.clamp_min(1e-30)).min().float(), peak.max().float()]))
        return self.original(x, norm, mean, var)

    def take(self) -> tuple[float, float] | None:
        """(smallest variance ratio, largest normalised value) since the last take; None if no GroupNorm ran."""
        kept, self.kept = self.kept, []
        if not kept:
            return None
        both = torch.stack(kept)
        return float(both[:, 0].min()), float(both[:, 1].max())

    def remove(self) -> None:
        self.layers._normalise = self.original


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).all()


def _sent_checks(ex, slot: int, rows: torch.Tensor) -> list:
    """What this rank sends at the end of a step: its output rows, the spans each peer reads, its own K/V part."""
    from asyncdiff_rt.strategies.patches.exchange import REGIONS

    out = [("sent rows", _finite(rows))]
    for q in ex.peers:
        spans = ex._spans_of(ex._flat_mine[slot], ex.wanted_from_me(q), REGIONS)
        out += [(f"sent span {i} to {q}", _finite(t)) for i, t in enumerate(spans)]
    return out + [(f"sent kv {k[0]}", _finite(w[:, :, ex.rank])) for k, w in ex._kv.items()]


def _received_checks(ex, slot: int, rows: torch.Tensor) -> list:
    """What this rank received: every patch's rows, the spans it reads of each peer, each peer's K/V part."""
    from asyncdiff_rt.strategies.patches.exchange import REGIONS

    out = [("gathered rows", _finite(rows))]
    for q in ex.peers:
        spans = ex._spans_of(ex._flat_theirs[slot][q], ex.wanted_of(q), REGIONS)
        out += [(f"received span {i} from {q}", _finite(t)) for i, t in enumerate(spans)]
        out += [(f"received kv {k[0]} from {q}", _finite(w[:, :, q])) for k, w in ex._kv.items()]
    return out


class _ExchangeTrace:
    """Wraps PatchExchange.end_step to record, on the device (no host synchronisation), per step whether what this
    rank sends (its output rows, its own flat regions, its own K/V part) and what it received (the peers' rows,
    flat regions and K/V parts) are finite: the first non-finite one tells a corrupted transfer (sent finite,
    received not) from a computation gone non-finite. The K/V received behind a deferred exchange is checked only
    after the caller's stream waited for it (the next step's check), so use it with the overlap paths off."""

    def __init__(self):
        from asyncdiff_rt.strategies.patches.exchange import PatchExchange

        self.cls, self.original, self.kept = PatchExchange, PatchExchange.end_step, []
        trace = self

        def end_step(ex, rows):
            slot = ex.policy.step % 2
            sent = _sent_checks(ex, slot, rows) if ex.frozen else []
            out = trace.original(ex, rows)
            checks = sent + _received_checks(ex, slot, out)
            trace.kept.append((ex.policy.step, [n for n, _ in checks], torch.stack([f for _, f in checks])))
            return out

        PatchExchange.end_step = end_step

    def take(self) -> str | None:
        """The first step and the names of the non-finite checks since the last take (None: all finite)."""
        kept, self.kept = self.kept, []
        for step, names, flags in kept:
            bad = [n for n, ok in zip(names, flags.tolist()) if not ok]
            if bad:
                return f"step {step}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
        return None

    def remove(self) -> None:
        self.cls.end_step = self.original


def _fingerprint(pipe) -> dict:
    """Sums that tell two launches apart: of the denoiser's weights and (below) of the plain latents. Equal sums in
    launches whose results differ point at the run's arithmetic (kernel choice, timing), not at its inputs."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    with torch.no_grad():
        return {"weights_sum": float(sum(p.double().sum() for p in denoiser.parameters()))}


def _poison(device: str) -> None:
    """Fill what the caching allocator will hand out next with NaN: large blocks (split for big tensors) and small
    ones (the pool of tensors up to 1 MiB). A run that reads memory it never wrote then turns non-finite at once,
    instead of only where a fresh allocation happens to hold garbage."""
    if not device.startswith("cuda"):
        return
    big = [torch.full((64 << 20,), float("nan"), dtype=torch.float16, device=device) for _ in range(64)]  # 8 GiB
    small = [torch.full((1 << 17,), float("nan"), dtype=torch.float16, device=device) for _ in range(2048)]
    del big, small


def _worker(rank: int, world: int, args: dict) -> list:
    from asyncdiff_rt import PatchParallel
    from asyncdiff_rt.strategies.patches.exchange import PatchExchange
    from asyncdiff_rt.tools.bench_setup import bench_pipeline

    device = "cuda:0" if args["device"] == "cuda" else "cpu"
    pipe, kwargs = bench_pipeline(args["model"], device, args["steps"], args["size"])
    kv_buffer = PatchExchange.kv_buffer
    watch_gn = _GroupNormWatch() if args["gn_stats"] else None
    trace = _ExchangeTrace() if args["trace"] else None

    def call(steps: int, watch: str = "flags") -> tuple[torch.Tensor, int | None]:
        seen = _FirstNonFinite(watch == "sync")
        with torch.no_grad():
            out = pipe(**{**kwargs, "num_inference_steps": steps}, generator=torch.Generator("cpu").manual_seed(0),
                       callback_on_step_end=None if watch == "nocb" else seen)  # fmt: skip
        return (out.images if hasattr(out, "images") else out[0]).float().cpu(), seen.step

    plain, bad = call(args["steps"], "nocb") if rank == 0 else (None, None)
    rows = [dict(name="plain", latents=plain, first_non_finite=[bad], captures=0, fingerprint=_fingerprint(pipe))]
    for text in args["configs"]:
        c = parse_config(text)
        os.environ[OVERLAP_ENV] = "1" if c["overlap"] else "0"
        PatchExchange.kv_buffer = kv_buffer if c["kv"] == "buffer" else (lambda self, key: None)
        transport = c["transport"] if args["device"] == "cuda" else "gloo"
        if args["poison"]:
            _poison(device)
        rt = PatchParallel(pipe, warm_up=c["warm_up"], sync_mode=c["mode"], transport=transport, graphs=c["graphs"])
        _, bad_first = call(c["warm_up"] + 3, c["watch"])  # captures the graphs, as the bench's untimed call
        if watch_gn is not None:
            watch_gn.take()  # only the measured call's
        traced = [trace.take()] if trace is not None else []
        second, bad_second = call(args["steps"], c["watch"])
        traced += [trace.take()] if trace is not None else []
        rows.append(dict(c, latents=second if rank == 0 else None, first_non_finite=[bad_first, bad_second],
                         captures=rt.captures))  # fmt: skip
        if traced:
            print(f"rank {rank}: {text}: first non-finite exchange value per call: {traced}", flush=True)
        if watch_gn is not None and not c["graphs"]:
            rows[-1]["gn_min_var_ratio"], rows[-1]["gn_max_normalised"] = watch_gn.take() or (None, None)
        rt.remove()
        del rt  # its buffers, graph pools and retired ipc slots, before the next configuration allocates its own
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if rank == 0:  # the plain pipeline again: whether anything outside the run's own buffers was overwritten
            rows[-1]["plain_after_unchanged"] = bool(torch.equal(call(args["steps"], "nocb")[0], plain))
        print(f"rank {rank}: {text} done (first non-finite step per call: {bad_first}, {bad_second})", flush=True)
    PatchExchange.kv_buffer = kv_buffer
    if watch_gn is not None:
        watch_gn.remove()
    if trace is not None:
        trace.remove()
    return rows


def _summary(rows: list) -> list[dict]:
    from asyncdiff_rt.tools.fidelity import compare

    plain, reference = rows[0]["latents"], rows[1]["latents"]
    out = []
    for row in rows:
        latents = row.pop("latents")
        entry = dict(row, finite=bool(torch.isfinite(latents).all()))
        if row is rows[0]:
            entry["fingerprint"] = dict(row["fingerprint"], plain_latents_sum=float(latents.double().sum()))
        if entry["finite"] and bool(torch.isfinite(plain).all()) and row is not rows[0]:
            entry["psnr_vs_plain_db"] = compare(plain, latents)["psnr_db"]
            if bool(torch.isfinite(reference).all()):
                entry["max_diff_vs_reference"] = float((latents - reference).abs().max())
        out.append(entry)
    return out


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="sdxl")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--patches", type=int, default=2)
    p.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="mode/graphs/overlap/W/transport/kv[/sync|nocb]"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gn_help = "eager configurations: the patch GroupNorms' smallest combined/own variance and largest normalised value"
    p.add_argument("--gn_stats", action="store_true", help=gn_help)
    poison_help = "before each configuration, fill the device memory cache with NaN (reads of unwritten memory show)"
    p.add_argument("--poison", action="store_true", help=poison_help)
    mps_help = "run the P processes at once under an MPS daemon of our own, each at 100/P %% of the SMs (as --emulate)"
    p.add_argument("--mps", action="store_true", help=mps_help)
    trace_help = "print per rank the first step and exchange value (sent or received) that is not finite"
    p.add_argument("--trace", action="store_true", help=trace_help)
    p.add_argument("--timeout_s", type=float, default=500.0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    for text in args.configs:
        parse_config(text)  # a clear error before any process starts
    spec = dict(model=args.model, size=args.size, steps=args.steps, device=args.device, configs=args.configs,
                gn_stats=args.gn_stats, poison=args.poison, trace=args.trace)  # fmt: skip
    if args.mps:  # the processes run at once, as in the bench's emulation, not time-sliced
        from asyncdiff_rt.tools.mps import MpsDaemon

        with MpsDaemon() as daemon:
            env = daemon.client_env(args.patches)
            summary = _summary(spawn(_worker, args.patches, spec, timeout_s=args.timeout_s, env=env)[0])
    else:
        summary = _summary(spawn(_worker, args.patches, spec, timeout_s=args.timeout_s)[0])
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(model=args.model, size=args.size, steps=args.steps, patches=args.patches, device=device,
                torch=torch.__version__, date=datetime.date.today().isoformat(), poisoned=args.poison, mps=args.mps,
                fingerprint=summary[0].pop("fingerprint"))  # fmt: skip
    lines = [
        f"# PatchParallel fidelity per runtime path: {args.model} at {args.size} px, P={args.patches} ({device})",
        "",
        f"{meta['date']}, torch {meta['torch']}: {args.steps} steps, P processes on one GPU "
        f"({f'at once under MPS, {100 // args.patches} % of the SMs each' if args.mps else 'time-sliced'}; values, "
        "not speed). "
        "Per configuration (mode/graphs/overlap/warm_up/transport/K/V path) a short call (captures the graphs), "
        "then the measured one; first non-finite step of each call (– : none); reference: the first configuration. "
        "GroupNorm (`--gn_stats`, eager configurations, the measured call): the smallest combined variance over the "
        "patch's own, and the largest |x - mean| / sqrt(var + eps) (half precision overflows above 65504). "
        f"Launch fingerprint (other launches alike only if equal): {meta['fingerprint']}. "
        f"Memory cache poisoned with NaN before each configuration: {'yes' if args.poison else 'no'}.",
        "",
        "| configuration | graphs | first non-finite step | finite | PSNR vs plain (dB) | max diff vs reference "
        "| plain after it unchanged | GN min var ratio | GN max normalised |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        psnr, diff = e.get("psnr_vs_plain_db"), e.get("max_diff_vs_reference")
        bad = ", ".join("–" if b is None else str(b) for b in e["first_non_finite"])
        lines.append(
            f"| {e['name']} | {e['captures']} | {bad} | {'yes' if e['finite'] else 'no'} | "
            f"{'–' if psnr is None else f'{psnr:.1f}'} | {'–' if diff is None else f'{diff:.3g}'} | "
            f"{e.get('plain_after_unchanged', '–')} | {_num(e.get('gn_min_var_ratio'))} | "
            f"{_num(e.get('gn_max_normalised'))} |"
        )
    safe = f"{args.model.replace(':', '_')}_{args.size}_{device.replace(' ', '_')}"
    stem = os.path.join(args.out, f"patch_fidelity_{safe}")
    os.makedirs(args.out, exist_ok=True)
    write_results(stem, {"meta": meta, "rows": summary}, lambda data: "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
