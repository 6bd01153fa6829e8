"""The one interface every transport implements (DESIGN §1): nccl, ipc, shm, gloo, local.

Ordering contract (see also runtime.py, "Note [step ordering]"): messages are matched per directed peer pair,
in call order: the i-th list rank a sends to rank b in an `exchange` meets the i-th list b receives from a. Calls
need not be symmetric: an `exchange` may name only some peers, or only sends, or only receives (the sequential
warm-up hands outputs down a chain of ranks this way), so counters of sequence numbers are per peer pair. `broadcast`
is issued by every rank of the transport in the same order. On GPU transports they are *enqueued*: the sends read
their tensors after all work already queued on the caller's current stream, and work the caller queues on that
stream afterwards sees the received data. Host-synchronous transports (gloo) simply complete before returning.
Every wait inside a transport has a timeout and raises `TransportError` naming the peer and the step, or the
phase where no step applies (`all_gather_object` / `broadcast_object`: "set-up agreement", or what the caller
names in `phase`, e.g. "plan agreement", "call agreement").
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import TransportError

__all__ = ["Transport", "TransportError"]


class Transport(ABC):
    name: str = "base"
    rank: int = 0
    world_size: int = 1
    timeout_s: float = 60.0

    def prepare(self, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:  # noqa: B027
        """Called once per shape before the first `exchange`, with example tensors of every later exchange
        (same peers, shapes, dtypes, order), so a transport can size slots and register buffers up front."""

    @abstractmethod
    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        """Send `sends[peer]` to each peer and fill `recvs[peer]` in place from each peer, in list order."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s."""

    @abstractmethod
    def all_gather_object(self, obj: Any, phase: str | None = None) -> list[Any]:
        """Small set-up metadata (plan hash, dtype, device type) from every rank, in rank order. `phase` names the
        agreement in errors (default "set-up agreement")."""

    def broadcast_object(self, obj: Any, src: int = 0, phase: str | None = None) -> Any:
        return self.all_gather_object(obj, phase)[src]

    def one_step(self) -> contextlib.AbstractContextManager:
        """A context in which several exchanges count as one step against the transport's throttle (stream
        transports: `max_inflight`), so that a step's transfer cut into groups (transport/deferred.py) costs no host
        wait between its groups. Others: nothing to do."""
        return contextlib.nullcontext()

    def message_counters(self) -> Any:
        """The host-side message counters a captured op advances without running (shm: the per-channel seqs);
        with `restore_message_counters` a failed or dropped CUDA-graph capture is undone. None: nothing to undo."""
        return None

    def restore_message_counters(self, counters: Any) -> None:  # noqa: B027
        """Set the counters back to what `message_counters` returned (the ops issued since never ran)."""

    def synchronize(self) -> None:  # noqa: B027
        """Wait (with the timeout) until everything enqueued so far has completed."""

    def close(self) -> None:  # noqa: B027
        """Release communicators and shared memory. Safe to call twice."""
