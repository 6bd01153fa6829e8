"""What the stream transports (`shm`, `nccl`) share: the constructor's checks and the set-up agreement through the
torch.distributed store (where every rank runs), the lazily started watchdog (Note [shm watchdog] in shm.py) and
its error, the phase named in set-up failures, close (once, stopping the watchdog first) and the size helper.

A subclass sets `name`, resolves its device in `_resolve_device`, finishes construction in `_setup`, builds its
watchdog in `_make_watchdog` and releases what it owns in `_close`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from typing import Any

import torch

from .. import native
from .base import Transport, TransportError
from .rendezvous import StoreRendezvous, describe_phase, group_store
from .watchdog import WatchdogThread

__all__ = ["StreamTransport", "nbytes"]

_instances: dict[str, itertools.count] = {}  # per transport kind: every rank builds them in the same order


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StreamTransport(Transport):
    def __init__(
        self,
        rank: int,
        world_size: int,
        store: Any,
        device: Any = None,
        timeout_s: float = 60.0,
        max_inflight: int = 2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        dev = self._resolve_device(device)
        self._C = native.load()
        if dev.type == "cuda":
            try:
                self._C.check_runtime()
            except RuntimeError as err:
                raise TransportError(f"{self.name} transport on {dev}: {err}") from err
        self.rank, self.world_size, self.timeout_s, self.device = rank, world_size, timeout_s, dev
        self.max_inflight = max(1, max_inflight)
        count = _instances.setdefault(self.name, itertools.count())
        namespace = f"asyncdiff_rt/{self.name}/{next(count)}"
        self._rdv = StoreRendezvous(store, rank, world_size, namespace, timeout_s, alive=self._C.process_alive)
        self._where: list[tuple[str, int]] = self._rdv.all_gather(
            (socket.gethostname(), os.getpid()), "set-up agreement (where every rank runs)"
        )
        here = socket.gethostname()
        self._local_peer_pids = {r: pid for r, (host, pid) in enumerate(self._where) if r != rank and host == here}
        self._watchdog: WatchdogThread | None = None
        self._closed = False
        self._last_step = -1  # the last step issued: set-up failures say "after step k", not a step of their own
        self._in_step: str | None = None  # inside `one_step`: "first" until its first exchange, then "joined"
        self._setup()

    @classmethod
    def from_group(cls, group: Any = None, device: Any = None, timeout_s: float = 60.0) -> StreamTransport:
        store, rank, world = group_store(group, cls.name)
        return cls(rank, world, store, device=device, timeout_s=timeout_s)

    # -- subclass hooks -----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """The rest of the constructor (rank, world size, device, timeout, rendezvous and peers are set)."""

    def _resolve_device(self, device: Any) -> torch.device:
        raise NotImplementedError

    def _make_watchdog(self) -> WatchdogThread:
        raise NotImplementedError

    def _close(self) -> None:
        """Release communicators / channels (the watchdog is stopped already)."""

    # -- shared -------------------------------------------------------------------------------------------------
    def _check_open(self, what: str, step: int) -> None:
        if self._closed:
            raise TransportError(f"{self.name} {what} at step {step}: the transport is closed")
        self._check_watchdog()

    def _check_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.error is not None:
            raise TransportError(self._watchdog.error)

    def _watchdog_error(self) -> str | None:
        return self._watchdog.error if self._watchdog is not None else None

    def _watch(self, step: int, item: Any) -> None:
        """Hand an issued exchange to the watchdog thread, started on first use."""
        if self._watchdog is None:
            self._watchdog = self._make_watchdog()
            self._watchdog.start()
        self._watchdog.watch(step, item)

    def _dead_peers(self, peers: Any = None) -> list[int]:
        """Peers on this host (of `peers`, default all) whose process exited."""
        return [
            r
            for r, pid in sorted(self._local_peer_pids.items())
            if (peers is None or r in peers) and not self._C.process_alive(pid)
        ]

    @contextlib.contextmanager
    def one_step(self):
        """The exchanges issued inside count as one against `max_inflight`: the first throttles and opens an
        in-flight entry, the later ones join it without a host wait (`_admit`)."""
        self._in_step = "first"
        try:
            yield
        finally:
            self._in_step = None

    def _admit(self) -> bool:
        """Whether the exchange being issued throttles and opens an in-flight entry of its own (False: it joins the
        last one, inside `one_step`)."""
        if self._in_step == "joined":
            return False
        if self._in_step == "first":
            self._in_step = "joined"
        return True

    def all_gather_object(self, obj: Any, phase: str | None = None) -> list[Any]:
        return self._rdv.all_gather(obj, describe_phase(phase, self._last_step))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.stop()
        self._close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
