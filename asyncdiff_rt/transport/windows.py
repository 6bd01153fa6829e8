"""Peer windows: one buffer per rank that every peer of the same host maps, so that a sender copies its values
straight into the receiver's buffer (a *put*) instead of into an exchange slot the receiver then copies out of
(shm.py, ipc.py): one copy per byte instead of two. PatchParallel's K/V use it (strategies/patches/exchange.py,
Note [K/V puts]).

Where it applies (`puts_supported`): the `ipc` transport on CUDA (the buffer shared through torch's CUDA IPC:
torch.multiprocessing.reductions, whose reference counts keep the exporter's memory alive while an importer maps
it) and the `shm` transport on the CPU (a file in /dev/shm that every rank maps, unlinked once all have: the CPU
tier runs the same put path over processes). The handles travel through the transport's set-up all-gather, so
every rank of the transport takes part in the set-up, in the same order.

A put says nothing to its receiver. Ordering is the caller's: a put must follow the receiver's last read of what
it overwrites, and the receiver may read it only after a message the sender issues behind the puts on the same
stream (the transports' flag write follows a memory barrier, Note [release fence] in csrc/shm_channel.cpp, so the
puts' bytes are visible once the message's flag is).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from .base import Transport
from .pieces import aligned

__all__ = ["PUTS_ENV", "PeerWindows", "put", "puts_supported", "puts_wanted"]

log = logging.getLogger("asyncdiff_rt")

# 0: never put (the K/V go through the exchange slots, as before 2026-12-08). Default 1: 234.9 against 241.1 ms per
# corrected_async_gn step (H100, 2048 px, P = 4, emulated, one call; benchmarks/README.md).
PUTS_ENV = "ASYNCDIFF_RT_PATCH_KV_PUTS"


def puts_supported(transport: Transport, device: torch.device) -> bool:
    """Whether `transport` on `device` can map its peers' windows (module docstring)."""
    name = getattr(transport, "name", "")
    return transport.world_size > 1 and (
        (name == "ipc" and device.type == "cuda") or (name == "shm" and device.type == "cpu")
    )


def puts_wanted() -> bool:
    """ASYNCDIFF_RT_PATCH_KV_PUTS (default 1): whether to put where `puts_supported`."""
    return os.environ.get(PUTS_ENV, "1") != "0"


def put(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each (dst, src), dst in a peer's window, on the current stream (on CUDA: enqueued, device to device)."""
    for dst, src in pairs:
        dst.copy_(src)


def _carve(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Consecutive buffers of `shapes` in `flat`, each starting on a 256-byte boundary (`_span` elements each)."""
    out, start = [], 0
    for shape in shapes:
        out.append(flat[start : start + math.prod(shape)].view(shape))
        start += _span(shape, flat.element_size())
    return out


def _span(shape: tuple[int, ...], itemsize: int) -> int:
    """Elements a buffer of `shape` takes in a window, up to where the next one starts."""
    return aligned(math.prod(shape) * itemsize) // itemsize


class PeerWindows:
    """This rank's window, as buffers of the shapes asked for (`local[i]`, zero-filled), and every peer's, mapped
    (`remote[q][i]`, the same shapes at the same offsets); made collectively by `create`."""

    def __init__(self, rank: int, local: list[torch.Tensor], remote: dict[int, list[torch.Tensor]]):
        self.rank, self.local, self.remote = rank, local, remote

    @classmethod
    def create(
        cls, transport: Transport, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
    ) -> PeerWindows | None:
        """Every rank of `transport` calls it alike, with the same shapes; None on every rank where any rank
        could not export or map its window (the reason logged), so that all ranks take the same path."""
        numel = sum(_span(shape, dtype.itemsize) for shape in shapes)
        peers = [q for q in range(transport.world_size) if q != transport.rank]
        phase = "the peer windows' set-up (K/V puts)"
        local, handle, path, problem = None, None, None, ""
        try:
            if device.type == "cuda":
                local = torch.zeros(numel, dtype=dtype, device=device)
                torch.cuda.current_stream(device).synchronize()  # the zeros land before any peer's first put
                handle = reduce_tensor(local)[1]
            else:
                path = f"/dev/shm/adrt_window_{os.getpid()}_{secrets.token_hex(4)}"
                local = torch.from_file(path, shared=True, size=numel, dtype=dtype)  # a new file: zero-filled
                handle = path
        except Exception as err:  # noqa: BLE001 - e.g. memory that CUDA IPC cannot export (expandable segments)
            problem = f"rank {transport.rank} could not export its window: {type(err).__name__}: {err}"
        try:
            exported = transport.all_gather_object((handle, problem), phase)
            remote, problem = {}, next((why for _, why in exported if why), "")
            if not problem:
                try:
                    for q in peers:
                        remote[q] = (
                            rebuild_cuda_tensor(*exported[q][0])
                            if device.type == "cuda"
                            else torch.from_file(exported[q][0], shared=True, size=numel, dtype=dtype)
                        )
                except Exception as err:  # noqa: BLE001
                    problem = f"rank {transport.rank} could not map a peer's window: {type(err).__name__}: {err}"
                problem = next((why for why in transport.all_gather_object(problem, phase) if why), "")
        finally:
            if path is not None and os.path.exists(path):
                os.unlink(path)  # after the second all-gather every peer mapped it (or gave up)
        if problem:
            log.warning("asyncdiff_rt: peer windows unavailable (%s): the K/V go through the exchange slots", problem)
            return None
        return cls(transport.rank, _carve(local, shapes), {q: _carve(remote[q], shapes) for q in peers})
