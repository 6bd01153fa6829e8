"""Set-up agreement through the torch.distributed store, shared by the transports (shm and nccl agree through it;
gloo leaves a mark in it per agreement, to name the peer that did not come when its collective fails)."""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .base import TransportError

__all__ = ["StoreRendezvous", "group_store", "describe_phase"]


def describe_phase(phase: str | None, last_step: int) -> str:
    """'set-up agreement (before the first step)', 'call agreement (after step 5)': what a transport was doing
    when no step number applies (a set-up or metadata agreement), instead of a made-up step such as -1."""
    where = "before the first step" if last_step < 0 else f"after step {last_step}"
    return f"{phase or 'set-up agreement'} ({where})"


class StoreRendezvous:
    """Small set-up agreement through a torch.distributed Store, under one key prefix per transport instance.

    Every rank's key of an agreement round carries its (host, pid), so a rank that waited in vain can name the
    peers that never arrived, and say whether a peer on this host exited (`alive(pid)`)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        namespace: str,
        timeout_s: float,
        alive: Callable[[int], bool] | None = None,
    ):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.alive = alive
        self.where: dict[int, tuple[str, int]] = {}  # rank -> (host, pid), from the rounds read so far
        self._round = 0

    def _key(self, n: int, rank: int) -> str:
        return f"{self.namespace}/ago/{n}/{rank}"

    def _wait(self, keys: list[str], what: str, missing: Callable[[], str] | None = None) -> None:
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as err:  # noqa: BLE001 - stores raise plain RuntimeErrors / DistStoreError
            who = (missing() if missing is not None else "") or "a peer died or did not reach the same point"
            raise TransportError(
                f"{self.namespace}: rank {self.rank} waited {self.timeout_s:.0f} s for {what} through the store: "
                f"{who} ({err})"
            ) from err

    def publish(self, key: str, value: bytes) -> None:
        self.store.set(f"{self.namespace}/{key}", value)

    def fetch(self, key: str, what: str, src: int = 0) -> bytes:
        full = f"{self.namespace}/{key}"
        self._wait([full], what, lambda: self.describe_missing([src]))
        return self.store.get(full)

    def from_rank0(self, key: str, make: Any, what: str) -> bytes:
        """Rank 0 calls make() and publishes the bytes; every rank returns them."""
        if self.rank == 0:
            value = make()
            self.publish(key, value)
            return value
        return self.fetch(key, what)

    # -- agreement rounds ---------------------------------------------------------------------------------------
    def arrive(self, obj: Any = None) -> int:
        """Publish this rank's key of the next round (its value: (host, pid), obj); return the round number."""
        n = self._round
        self._round += 1
        self.store.set(self._key(n, self.rank), pickle.dumps(((socket.gethostname(), os.getpid()), obj)))
        if n >= 2:  # every rank has read round n-2 once this rank is in round n
            try:
                self.store.delete_key(self._key(n - 2, self.rank))
            except Exception:  # noqa: BLE001 - not every store deletes; the keys are small
                pass
        return n

    def all_gather(self, obj: Any, what: str = "set-up agreement") -> list[Any]:
        n = self.arrive(obj)
        keys = [self._key(n, r) for r in range(self.world_size)]
        what = f"{what[:-1]}, round {n})" if what.endswith(")") else f"{what} (round {n})"
        self._wait(keys, what, lambda: self.missing(n))
        out = []
        for r, k in enumerate(keys):
            self.where[r], value = pickle.loads(self.store.get(k))
            out.append(value)
        return out

    def missing(self, n: int) -> str:
        """Which peers have not arrived at round `n`, or exited after arriving: '' when none is known (the
        store may not answer: its host, rank 0, may be gone)."""
        try:
            absent = []
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                if not self.store.check([self._key(n, r)]):
                    absent.append(r)
                elif r not in self.where:
                    self.where[r] = pickle.loads(self.store.get(self._key(n, r)))[0]
        except Exception:  # noqa: BLE001
            return ""
        if absent:
            return self.describe_missing(absent)
        dead = self.dead_peers()
        return f"{', '.join(self.describe_peer(r) for r in dead)} exited during it" if dead else ""

    def describe_missing(self, ranks: list[int]) -> str:
        if not ranks:
            return ""
        parts = [self.describe_peer(r) for r in ranks]
        verb = "has" if len(ranks) == 1 else "have"
        return f"{', '.join(parts)} {verb} not reached it (died, stalled, or did not call the pipeline)"

    def describe_peer(self, rank: int) -> str:
        host, pid = self.where.get(rank, (None, None))
        if pid is not None and host == socket.gethostname() and self.alive is not None and not self.alive(pid):
            return f"peer rank {rank} (pid {pid}, exited)"
        return f"peer rank {rank}" + (f" (pid {pid} on {host})" if pid is not None else "")

    def refresh(self) -> None:
        """Learn (host, pid) of the peers not seen yet from the last round's marks (after a failure)."""
        n = self._round - 1
        for r in range(self.world_size):
            if r == self.rank or r in self.where or n < 0:
                continue
            try:
                if self.store.check([self._key(n, r)]):
                    self.where[r] = pickle.loads(self.store.get(self._key(n, r)))[0]
            except Exception:  # noqa: BLE001 - the store may be gone with its host
                return

    def dead_peers(self) -> list[int]:
        """Peers on this host, seen in an earlier round, whose process exited."""
        if self.alive is None:
            return []
        here = socket.gethostname()
        return [
            r
            for r, (host, pid) in sorted(self.where.items())
            if r != self.rank and host == here and not self.alive(pid)
        ]


def group_store(group: Any, kind: str) -> tuple[Any, int, int]:
    """(store, rank, world_size) for a torch.distributed group: the default store under a prefix that names the
    group's ranks, so sub-groups (8 GPUs as 2 x n4) do not collide."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not (dist.is_available() and dist.is_initialized()):
        raise TransportError(f"the {kind} transport needs an initialised torch.distributed process group")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    store = dist.PrefixStore(f"asyncdiff_rt/{kind}/{'-'.join(map(str, ranks))}/", c10d._get_default_store())
    return store, dist.get_rank(group), dist.get_world_size(group)
