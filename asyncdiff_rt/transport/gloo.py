"""`gloo`: torch.distributed point-to-point on CPU tensors; host-synchronous, the CI vehicle."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .base import Transport, TransportError

__all__ = ["GlooTransport"]


class GlooTransport(Transport):
    name = "gloo"

    def __init__(self, group: Any = None, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        if group is None or dist.get_backend(group) != "gloo":
            ranks = None if group is None else dist.get_process_group_ranks(group)
            # a gloo group of our own: our own timeout, and CPU tensors even when the caller's group is NCCL
            group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]

    def _fail(self, what: str, peer: int | None, step: int, err: Exception) -> TransportError:
        who = f"rank {peer}" if peer is not None else "a peer"
        return TransportError(
            f"gloo {what} with {who} failed at step {step} (timeout {self.timeout_s:.0f} s): {err}. "
            "A peer process died, stalled, or disagrees on the configuration; see its log."
        )

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        ops = []
        for peer in sorted(set(sends) | set(recvs)):  # one place issues all point-to-point ops, sorted by peer
            for t in sends.get(peer, []):
                ops.append(dist.P2POp(dist.isend, t.contiguous(), self._global[peer], self.group))
            for t in recvs.get(peer, []):
                ops.append(dist.P2POp(dist.irecv, t, self._global[peer], self.group))
        if not ops:
            return
        try:
            for work in dist.batch_isend_irecv(ops):
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as err:  # noqa: BLE001 - gloo raises plain RuntimeErrors
            raise self._fail("exchange", min(set(sends) | set(recvs)), step, err) from err

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        if self.world_size == 1:
            return
        try:
            dist.broadcast(tensor, self._global[src], group=self.group)
        except Exception as err:  # noqa: BLE001
            raise self._fail("broadcast", src, step, err) from err

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as err:  # noqa: BLE001
            raise self._fail("set-up agreement", None, -1, err) from err
        return out
