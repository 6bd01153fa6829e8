"""Worker side of the ipc transport tests on one GPU (tests/cuda/test_ipc_cuda.py): every rank is a process on
cuda:0 with an IpcTransport over a FileStore. Receive buffers are poisoned (NaN / -7) before every exchange, so a
receive that did not land shows; messages grow at steps 5 and 10 (new channel generations); one rank may stall
its host for a while at one step (its peers' streams wait on the flags)."""

from __future__ import annotations

import time

import torch

GROW_AT = (5, 10)


def payload(step: int, src: int, dst: int) -> list[torch.Tensor]:
    """What rank src sends rank dst at `step`: a float block that grows, and a small int64 tail."""
    n = 64 * 33 * (1 if step < GROW_AT[0] else 40 if step < GROW_AT[1] else 400)
    base = float(step * 100 + src * 10 + dst)
    return [
        torch.arange(n, dtype=torch.float32, device="cuda") % 97 + base,
        torch.arange(5 + src + dst, dtype=torch.int64, device="cuda") * (step + 1),
    ]


def poisoned_like(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, -7) for t in ts]


def transport_rank(
    rank: int, world: int, store_path: str, steps: int, delay: tuple[int, int, float] | None, slot_mb: str = ""
):
    """Exchange with every peer and broadcast from rank step % world, `steps` times; returns the mismatches, the
    generation of every send channel and every channel's capacity. `slot_mb`: the slot cap (transport/shm.py,
    Note [slot cap]), so that the larger messages travel in pieces."""
    import os

    import torch.distributed as dist

    from asyncdiff_rt.transport.ipc import IpcTransport

    if slot_mb:
        os.environ["ASYNCDIFF_RT_SLOT_MB"] = slot_mb

    torch.cuda.set_device(0)
    tr = IpcTransport(rank, world, dist.FileStore(store_path, world), device="cuda:0", timeout_s=60.0)
    peers = [p for p in range(world) if p != rank]
    errors = []
    for step in range(steps):
        if delay is not None and delay[0] == rank and delay[1] == step:
            time.sleep(delay[2])
        sends = {p: payload(step, rank, p) for p in peers}
        recvs = {p: poisoned_like(payload(step, p, rank)) for p in peers}
        tr.exchange(step, sends, recvs)
        for p, ts in recvs.items():
            for got, want in zip(ts, payload(step, p, rank)):
                if not torch.equal(got, want):
                    errors.append(f"exchange step {step} from {p}")
        src = step % world
        x = torch.full((2, 999), float(step) if rank == src else float("nan"), device="cuda")
        tr.broadcast(x, src=src, step=step)
        if not torch.equal(x, torch.full((2, 999), float(step), device="cuda")):
            errors.append(f"broadcast step {step} from {src}")
    tr.synchronize()
    generations = {p: link.generation for p, link in tr._send.items()}
    capacities = [link.channel.capacity for link in (*tr._send.values(), *tr._recv.values())]
    tr.all_gather_object(None)  # every rank got every message before any closes
    tr.close()
    return errors, generations, capacities
