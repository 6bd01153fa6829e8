"""Worker side of tests/test_slot_pieces.py: an all-to-all exchange and a broadcast over `shm` with messages larger
than the slot cap (transport/shm.py, Note [slot cap]), each rank with its own ASYNCDIFF_RT_SLOT_MB."""

from __future__ import annotations

import os

import torch

SIZES = (70_001, 3, 200_000, 0, 65_536)  # float32 elements: parts above, below and at the 64 KiB cap


def payload(src: int, dst: int) -> list[torch.Tensor]:
    """What `src` sends `dst`: a different number of parts per pair, so peers need different piece counts."""
    return [torch.arange(n, dtype=torch.float32) * (src + 1) + dst for n in SIZES[: 2 + (src + dst) % 4]]


def run_all_to_all(rank: int, world: int, slot_mb: list[str]) -> dict:
    import torch.distributed as dist

    from asyncdiff_rt.transport.shm import ShmTransport

    os.environ["ASYNCDIFF_RT_SLOT_MB"] = slot_mb[rank]
    dist.init_process_group("gloo")
    transport = ShmTransport.from_group(timeout_s=30.0)
    try:
        peers = [q for q in range(world) if q != rank]
        wrong = []
        for step in range(3):  # more exchanges than slots: pieces reuse both slots many times
            recvs = {q: [torch.full_like(t, -1.0) for t in payload(q, rank)] for q in peers}
            transport.exchange(step, {q: payload(rank, q) for q in peers}, recvs)
            wrong += [
                (step, q, i)
                for q in peers
                for i, (a, b) in enumerate(zip(recvs[q], payload(q, rank)))
                if not torch.equal(a, b)
            ]
        big = torch.arange(300_000, dtype=torch.float32) if rank == 1 else torch.zeros(300_000)
        transport.broadcast(big, src=1, step=3)
        transport.synchronize()
        capacities = [link.channel.capacity for link in (*transport._send.values(), *transport._recv.values())]
        return dict(
            wrong=wrong, broadcast_ok=torch.equal(big, torch.arange(300_000, dtype=torch.float32)),
            slot_bytes=transport.slot_bytes, capacities=capacities,
        )  # fmt: skip
    finally:
        transport.close()
