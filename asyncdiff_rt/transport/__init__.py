"""Transports behind one interface (DESIGN §1): `nccl`, `ipc`, `shm`, `gloo`, `local`, and `auto`'s choice
(select.py: `auto` on CUDA settles between `ipc` and `nccl` once the process group exists)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .base import Transport, TransportError
from .select import ipc_refusal, process_group_backend

__all__ = ["Transport", "TransportError", "make_transport", "ensure_process_group", "TRANSPORTS"]

TRANSPORTS = ("auto", "nccl", "ipc", "shm", "gloo", "local")


def ensure_process_group(device: torch.device, timeout_s: float, transport: str = "auto") -> None:
    """Use the caller's process group; otherwise initialise one from torchrun's environment (never twice):
    NCCL when the runtime exchanges through NCCL, else gloo (ipc, shm and gloo only need its store and CPU ops);
    `transport` as asked ("auto" included: select.process_group_backend)."""
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "asyncdiff_rt needs one process per rank: launch with `torchrun --nproc_per_node=N script.py` "
            "(N = model_n + stride - 1), initialise torch.distributed yourself, or use transport='local'"
        )
    backend = process_group_backend(device, transport)
    if backend == "nccl" and device.index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def resolve(name: str, device: torch.device) -> str:
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {name!r}")
    if name == "ipc":
        problem = ipc_refusal(device)  # refused here, before any process group or GPU work (DESIGN §6)
        if problem:
            raise TransportError(problem)
    if name != "auto":
        return name
    if device.type == "cuda":
        return "nccl"  # until the ranks are known: Session settles `auto` between ipc and nccl (select.choose_auto)
    return "gloo"


def make_transport(name: str, device: torch.device, group: Any, timeout_s: float) -> Transport:
    """Build the transport; `name` already resolved. Process-group set-up happens before (ensure_process_group)."""
    if name == "local":
        from .local import LocalTransport

        return LocalTransport()
    if name == "gloo":
        from .gloo import GlooTransport

        return GlooTransport(group=group, timeout_s=timeout_s)
    if name == "shm":
        from .shm import ShmTransport

        return ShmTransport.from_group(group=group, device=device, timeout_s=timeout_s)
    if name == "ipc":
        from .ipc import IpcTransport

        return IpcTransport.from_group(group=group, device=device, timeout_s=timeout_s)
    if name == "nccl":
        from .nccl import NcclTransport

        return NcclTransport.from_group(group=group, device=device, timeout_s=timeout_s)
    raise ValueError(f"unknown transport {name!r}")
