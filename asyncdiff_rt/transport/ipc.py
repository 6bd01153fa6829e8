"""`ipc`: device memory shared through CUDA IPC between the processes of one host (DESIGN §1, csrc/shm_channel.h,
Note [ipc channel]): processes sharing one GPU (under MPS, or time-sliced) or on GPUs with peer access.

Everything but where the slots live is the `shm` transport's (shm.py): one native channel per directed peer pair,
created by the sender and opened by the receiver, double buffered, growing by generations, on two high-priority
communication streams ordered after the caller's stream, at most `max_inflight` exchanges outstanding, the
watchdog, every wait with the timeout naming the peer and the step, capturable in CUDA graphs. The slots are
device memory the sender allocates and exports (cudaIpcGetMemHandle), the receiver maps it (cudaIpcOpenMemHandle),
and both copies are device to device: no trip through host memory. The flags that order them stay in page-locked
shared memory and are written and awaited by the streams (stream memory operations): no host synchronisation.

Note [ipc teardown] (csrc/channel_header.h) shapes two things here: a replaced generation is kept (not closed)
until the transport closes, since closing CUDA IPC mappings and freeing exported memory may synchronise the device
while other channels' streams wait on peers; and `close` closes the receiving channels before the sending ones,
so every rank drops its mappings before it frees what it exported.

Set-up agrees (through the store) that CUDA IPC works between every pair of ranks, so that either every rank
builds the transport or every rank raises TransportError naming the problem and the fix (select.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import TransportError
from .select import agree_ipc, ipc_refusal
from .shm import ShmTransport, _Link

__all__ = ["IpcTransport"]


class IpcTransport(ShmTransport):
    name = "ipc"
    _channel_type = "IpcChannel"

    def _resolve_device(self, device: Any) -> torch.device:
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        problem = ipc_refusal(dev)
        if problem:
            raise TransportError(problem)
        return dev

    def _setup(self) -> None:
        verdicts = agree_ipc(self._rdv, self.rank, self.device, "ipc set-up agreement")
        bad = [v for v in verdicts if v]
        if bad:
            more = f" (and {len(bad) - 1} more rank(s) with a problem)" if len(bad) > 1 else ""
            raise TransportError(f"the ipc transport cannot run between these ranks: {bad[0]}{more}")
        super()._setup()

    def _retire(self, link: _Link, old: Any, sending: bool) -> None:
        link.retired.append(old)  # closed with the transport (Note [ipc teardown], module docstring)

    def _prune(self, link: _Link) -> None:
        pass
