"""`gloo`: torch.distributed point-to-point on CPU tensors; host-synchronous, the CI vehicle."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .base import Transport, TransportError
from .rendezvous import StoreRendezvous, describe_phase, group_store

__all__ = ["GlooTransport"]

_instances = itertools.count()  # every rank builds its transports in the same order


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
        self._last_step = -1
        # Every agreement leaves this rank's mark (host, pid) in the store: when the collective fails, the marks
        # name the peer that never came (a rank that did not call the pipeline) or that exited.
        try:
            from .. import native

            alive = native.load().process_alive
        except Exception:  # noqa: BLE001 - without the native module, no pid check
            alive = None
        try:
            store, _, _ = group_store(group, "gloo")
            namespace = f"asyncdiff_rt/gloo/{next(_instances)}"
            self._rdv: StoreRendezvous | None = StoreRendezvous(
                store, self.rank, self.world_size, namespace, timeout_s, alive
            )
        except Exception:  # noqa: BLE001 - no default store (a group built by hand): errors name no peer
            self._rdv = None

    def _fail(self, what: str, peers: list[int], step: int, err: Exception) -> TransportError:
        if self._rdv is not None:
            self._rdv.refresh()
        dead = self._rdv.dead_peers() if self._rdv is not None else []
        named = [p for p in peers if p in dead] or peers[:1]  # a peer of this op that exited, else the first
        who = self._rdv.describe_peer(named[0]) if self._rdv is not None else f"peer rank {named[0]}"
        return TransportError(
            f"gloo {what} with {who} failed at step {step} (timeout {self.timeout_s:.0f} s): {err}. "
            "A peer process died, stalled, or disagrees on the configuration; see its log."
        )

    def _fail_agreement(self, phase: str, n: int | None, err: Exception) -> TransportError:
        who = self._rdv.missing(n) if self._rdv is not None and n is not None else ""
        return TransportError(
            f"gloo {phase} failed on rank {self.rank}: {who or 'a peer died or did not reach it'} "
            f"(timeout {self.timeout_s:.0f} s): {err}. A peer process died, stalled, did not call the pipeline, "
            "or disagrees on the configuration; see its log."
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
        self._last_step = step
        try:
            for work in dist.batch_isend_irecv(ops):
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as err:  # noqa: BLE001 - gloo raises plain RuntimeErrors
            raise self._fail("exchange", sorted(set(sends) | set(recvs)), step, err) from err

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        if self.world_size == 1:
            return
        self._last_step = step
        try:
            dist.broadcast(tensor, self._global[src], group=self.group)
        except Exception as err:  # noqa: BLE001
            others = [src] if src != self.rank else [r for r in range(self.world_size) if r != src]
            raise self._fail(f"broadcast from rank {src}", others, step, err) from err

    def all_gather_object(self, obj: Any, phase: str | None = None) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        what = describe_phase(phase, self._last_step)
        n = None
        try:
            n = self._rdv.arrive() if self._rdv is not None else None
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as err:  # noqa: BLE001
            raise self._fail_agreement(what, n, err) from err
        return out
