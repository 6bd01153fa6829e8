"""Set-up agreement through the torch.distributed store, shared by the stream transports (shm, nccl)."""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

from .base import TransportError

__all__ = ["StoreRendezvous", "group_store"]


class StoreRendezvous:
    """Small set-up agreement through a torch.distributed Store, under one key prefix per transport instance."""

    def __init__(self, store: Any, rank: int, world_size: int, namespace: str, timeout_s: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._round = 0

    def _wait(self, keys: list[str], what: str) -> None:
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as err:  # noqa: BLE001 - stores raise plain RuntimeErrors / DistStoreError
            raise TransportError(
                f"{self.namespace}: rank {self.rank} waited {self.timeout_s:.0f} s for {what} through the store; "
                f"a peer died or did not reach the same point ({err})"
            ) from err

    def publish(self, key: str, value: bytes) -> None:
        self.store.set(f"{self.namespace}/{key}", value)

    def fetch(self, key: str, what: str) -> bytes:
        full = f"{self.namespace}/{key}"
        self._wait([full], what)
        return self.store.get(full)

    def from_rank0(self, key: str, make: Any, what: str) -> bytes:
        """Rank 0 calls make() and publishes the bytes; every rank returns them."""
        if self.rank == 0:
            value = make()
            self.publish(key, value)
            return value
        return self.fetch(key, what)

    def all_gather(self, obj: Any) -> list[Any]:
        n = self._round
        self._round += 1
        self.publish(f"ago/{n}/{self.rank}", pickle.dumps(obj))
        keys = [f"{self.namespace}/ago/{n}/{r}" for r in range(self.world_size)]
        self._wait(keys, f"all_gather_object round {n}")
        out = [pickle.loads(self.store.get(k)) for k in keys]
        if n >= 2:  # every rank has read round n-2 once this rank is in round n
            try:
                self.store.delete_key(f"{self.namespace}/ago/{n - 2}/{self.rank}")
            except Exception:  # noqa: BLE001 - not every store deletes; the keys are small
                pass
        return out


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
