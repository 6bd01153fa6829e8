"""Latency and bandwidth of one slot exchange between two processes on ONE GPU, for the real hidden-state sizes
(SD2.1 768 px and SDXL 1024 px, batch 2, fp16), over asyncdiff_rt's `ipc` transport (device slots shared through
CUDA IPC: device-to-device copies) and `shm` transport (page-locked shared host memory), against the pinned-copy
ceiling (cudaMemcpyAsync D2H then H2D through page-locked memory, one process) and torch.distributed gloo (CPU
tensors, with the device copies on both sides).

    python benchmarks/exchange.py --out benchmarks/results
    python benchmarks/exchange.py --models sdxl_1024 --kinds ipc,shm --iters 10     # a quick check

One-way time = ping-pong round trip / 2, median of --iters after warm-up. Writes exchange_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# block outputs that cross segment boundaries (batch 2, fp16), the largest of each resolution level
SIZES = {
    "sd21_768": [(2, 1280, 24, 24), (2, 640, 48, 48), (2, 320, 96, 96), (2, 640, 96, 96)],
    "sdxl_1024": [(2, 1280, 32, 32), (2, 640, 64, 64), (2, 320, 128, 128), (2, 640, 128, 128)],
}


KINDS = ("ipc", "shm", "gloo")


def _median_pingpong(step, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / 2


def _pinned_ceiling(shape, iters: int) -> float:
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    host = torch.empty(shape, dtype=torch.float16, pin_memory=True)
    y = torch.empty_like(x)

    def step():  # two one-way trips, like a ping-pong
        for _ in range(2):
            host.copy_(x, non_blocking=True)
            y.copy_(host, non_blocking=True)

    return _median_pingpong(step, iters)


def _transport_pingpong(transport, rank: int, x, y, seq: list) -> None:
    seq[0] += 1
    peer = 1 - rank
    if rank == 0:
        transport.exchange(seq[0], {peer: [x]}, {})
        transport.exchange(seq[0], {}, {peer: [y]})
    else:
        transport.exchange(seq[0], {}, {peer: [y]})
        transport.exchange(seq[0], {peer: [y]}, {})
    transport.synchronize()


def _gloo_pingpong(dist, rank: int, x, y, hx, hy) -> None:
    if rank == 0:
        hx.copy_(x)
        dist.send(hx, 1)
        dist.recv(hy, 1)
        y.copy_(hy)
    else:
        dist.recv(hy, 0)
        y.copy_(hy)
        hx.copy_(y)
        dist.send(hx, 0)


def _worker(rank: int, world: int, kind: str, shapes: list, iters: int) -> dict:
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    out: dict = {}
    stream = kind in ("shm", "ipc")  # asyncdiff_rt's transports; else gloo
    if kind == "shm":
        from asyncdiff_rt.transport.shm import ShmTransport

        transport = ShmTransport.from_group(device=torch.device("cuda:0"), timeout_s=60)
    elif kind == "ipc":
        from asyncdiff_rt.transport.ipc import IpcTransport

        transport = IpcTransport.from_group(device=torch.device("cuda:0"), timeout_s=60)
    for shape in shapes:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        y = torch.empty_like(x)
        if stream:
            transport.prepare({1 - rank: [x]}, {1 - rank: [y]})
            step = functools.partial(_transport_pingpong, transport, rank, x, y, [0])
        else:
            hx, hy = torch.empty(shape, dtype=torch.float16), torch.empty(shape, dtype=torch.float16)
            step = functools.partial(_gloo_pingpong, dist, rank, x, y, hx, hy)
        t = _median_pingpong(step, iters)
        if rank == 0 and stream:  # correctness of the last transfer: the echo equals what was sent
            assert torch.equal(y, x), f"{kind} exchange returned wrong data"
        out[str(shape)] = t
    if stream:
        transport.all_gather_object(None)  # both ranks done before either closes
        transport.close()
    dist.destroy_process_group()
    return out


def main() -> int:
    from asyncdiff_rt.tools.launch import spawn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--models", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    kinds = [k for k in args.kinds.split(",") if k]
    for name, known in (("model", SIZES), ("kind", KINDS)):
        bad = [v for v in (models if name == "model" else kinds) if v not in known]
        if bad:
            p.error(f"unknown {name}(s) {', '.join(bad)}; choose from {', '.join(known)}")
    device = torch.cuda.get_device_name(0)
    rows = []
    for model in models:
        shapes = SIZES[model]
        timed = {kind: spawn(_worker, 2, kind, shapes, args.iters, timeout_s=300)[0] for kind in kinds}
        for shape in shapes:
            nbytes = torch.Size(shape).numel() * 2
            ceil = _pinned_ceiling(shape, args.iters)
            row = dict(model=model, shape=list(shape), mbytes=nbytes / 1e6, pinned_ms=ceil * 1e3)
            row.update({f"{kind}_ms": timed[kind][str(shape)] * 1e3 for kind in kinds})
            rows.append(row)
    meta = dict(
        device=device, torch=torch.__version__, date=datetime.date.today().isoformat(), iters=args.iters, kinds=kinds
    )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"exchange_{device.replace(' ', '_')}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"# One-way slot exchange between two processes on one GPU — {device}, torch {meta['torch']}, {meta['date']}",
        "",
        "fp16, batch 2; one-way = ping-pong / 2, median of "
        f"{args.iters}. Pinned ceiling: D2H + H2D through page-locked memory in one process. ipc: device slots "
        "shared through CUDA IPC (D2D); shm: through page-locked shared host memory; gloo: CPU tensors.",
        "",
        "| model | shape | MB | pinned ceiling ms (GB/s) | "
        + " | ".join(f"{k} ms (GB/s) | {k} / ceiling" for k in kinds)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(kinds),
    ]
    for r in rows:
        mb = r["mbytes"]  # MB per ms = GB/s
        cells = [
            f"{r['model']}",
            f"{tuple(r['shape'])}",
            f"{mb:.1f}",
            f"{r['pinned_ms']:.3f} ({mb / r['pinned_ms']:.1f})",
        ]
        for k in kinds:
            ms = r[f"{k}_ms"]
            cells += [f"{ms:.3f} ({mb / ms:.1f})", f"{ms / r['pinned_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
