"""`nccl`: a communicator owned by the native library (csrc/nccl_comm.h), between GPUs (DESIGN §1, §5).

The unique id comes from rank 0 through the torch.distributed store. All point-to-point traffic of one exchange
is one ncclGroup of byte sends/receives on a dedicated high-priority communication stream, ordered after the
caller's current stream and before the caller's later work (Note [stream ordering] in csrc/streams.h). The host
keeps at most `max_inflight` exchanges outstanding; waiting on the oldest is where a dead or stalled peer is
noticed: NCCL's asynchronous error or the timeout aborts the communicator and raises TransportError naming the
step. Capturable into CUDA graphs once every peer edge has been used eagerly (NCCL connects lazily).

A watchdog thread (as Note [shm watchdog] in shm.py) watches host-visible completion marks that the
communication stream writes after each exchange; when a peer process on this host exited or nothing completed
for `timeout_s`, it aborts the communicator (thread-safe in the native layer), which stops its kernels, so a
host sync outside the transport does not hang; the next transport call raises TransportError naming the step.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

import torch

from .. import native
from .base import Transport, TransportError
from .rendezvous import StoreRendezvous, group_store
from .watchdog import WatchdogThread

__all__ = ["NcclTransport"]

_instances = itertools.count()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Watchdog(WatchdogThread):
    def __init__(self, owner: NcclTransport, poll_s: float = 0.02):
        super().__init__(owner, "nccl", poll_s)
        self._comm = owner._comm  # only its thread-safe calls: completed, abort
        self._C = owner._C
        self._peer_pids = dict(owner._local_peer_pids)

    def run(self) -> None:
        for head in self.heads():
            step, issued_at, seq = head
            if self._comm.completed(seq):
                self.done(head)
                continue
            dead = [r for r, pid in self._peer_pids.items() if not self._C.process_alive(pid)]
            problem = f"peer rank {dead[0]} (pid {self._peer_pids[dead[0]]}) exited" if dead else ""
            problem = problem or self.stalled(issued_at)
            if problem:
                owner = self._owner()
                rank = owner.rank if owner is not None else "?"
                del owner
                self.error = (
                    f"nccl transport on rank {rank}: step {step}: {problem}; the watchdog aborted the communicator, "
                    "so the data of this step and later ones is invalid"
                )
                self._comm.abort(self.error)
                self.clear()
                return


class NcclTransport(Transport):
    name = "nccl"

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
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the nccl transport needs a CUDA device, got {dev}; use 'shm' or 'gloo' on CPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self._C = native.load()
        try:
            self._C.check_runtime()
        except RuntimeError as err:
            raise TransportError(f"nccl transport on {dev}: {err}") from err
        self.rank, self.world_size, self.timeout_s, self.device = rank, world_size, timeout_s, dev
        self.max_inflight = max(1, max_inflight)
        self._rdv = StoreRendezvous(store, rank, world_size, f"asyncdiff_rt/nccl/{next(_instances)}", timeout_s)
        where = self._rdv.all_gather((socket.gethostname(), os.getpid()))
        self._local_peer_pids = {
            r: pid for r, (host, pid) in enumerate(where) if r != rank and host == socket.gethostname()
        }
        uid = self._rdv.from_rank0("uid", self._C.nccl_unique_id, "the NCCL unique id")
        self._stream = torch.cuda.Stream(dev, priority=-1)
        try:
            self._comm = self._C.NcclComm(uid, world_size, rank, dev.index, timeout_s)
        except RuntimeError as err:
            raise TransportError(f"nccl set-up on rank {rank} of {world_size} failed: {err}") from err
        self._inflight: list[tuple[int, int]] = []  # (step, seq of its completion mark), oldest first
        self._seq = 0
        self._last_step = -1
        self._watchdog: _Watchdog | None = None
        self._closed = False

    @classmethod
    def from_group(cls, group: Any = None, device: Any = None, timeout_s: float = 60.0) -> NcclTransport:
        store, rank, world = group_store(group, "nccl")
        return cls(rank, world, store, device=device, timeout_s=timeout_s)

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise ValueError(f"nccl transport on {self.device} got a tensor on {t.device}")

    def _check_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.error is not None:
            raise TransportError(self._watchdog.error)

    def _fail(self, what: str, step: int, err: Exception) -> TransportError:
        if self._watchdog is not None and self._watchdog.error is not None:
            return TransportError(f"{self._watchdog.error} ({what}: {err})")
        return TransportError(f"nccl {what} at step {step} on rank {self.rank} of {self.world_size} failed: {err}")

    def _throttle(self, keep: int) -> None:
        while len(self._inflight) > keep:
            step, seq = self._inflight[0]
            t0 = time.monotonic()
            while not self._comm.completed(seq):
                try:
                    self._comm.check_async(step)
                except RuntimeError as err:
                    raise self._fail("wait", step, err) from err
                if time.monotonic() - t0 > self.timeout_s:
                    self._comm.abort(f"step {step} timed out")
                    raise TransportError(
                        f"nccl exchange at step {step} on rank {self.rank} of {self.world_size} did not complete "
                        f"within {self.timeout_s:.0f} s: a peer died or stalled; the communicator was aborted"
                    )
                time.sleep(1e-4)
            self._inflight.pop(0)

    def _enqueue(self, what: str, step: int, issue) -> None:
        if self._closed:
            raise TransportError(f"nccl {what} at step {step}: the transport is closed")
        self._check_watchdog()
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._throttle(self.max_inflight - 1)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            issue(self._stream.cuda_stream)
        except RuntimeError as err:
            raise self._fail(what, step, err) from err
        current.wait_stream(self._stream)
        self._last_step = step
        if not capturing:
            self._seq += 1
            try:
                self._comm.mark_done(self._stream.cuda_stream, self._seq)
            except RuntimeError as err:
                raise self._fail(what, step, err) from err
            self._inflight.append((step, self._seq))
            if self._watchdog is None:
                self._watchdog = _Watchdog(self)
                self._watchdog.start()
            self._watchdog.watch(step, self._seq)

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        if not sends and not recvs:
            return
        send_list, recv_list, copies = [], [], []
        for peer in sorted(sends):
            for t in sends[peer]:
                self._check(t)
                t = t if t.is_contiguous() else t.contiguous()
                send_list.append((peer, t.data_ptr(), _nbytes(t)))
                copies.append(t)  # keep alive until issued
        for peer in sorted(recvs):
            for t in recvs[peer]:
                self._check(t)
                buf = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                recv_list.append((peer, buf.data_ptr(), _nbytes(buf)))
                if buf is not t:
                    copies.append((t, buf))
        self._enqueue("exchange", step, lambda s: self._comm.sendrecv(send_list, recv_list, s))
        for item in copies:
            if isinstance(item, tuple):
                item[0].copy_(item[1])

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        if self.world_size == 1:
            return
        self._check(tensor)
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        self._enqueue("broadcast", step, lambda s: self._comm.broadcast(buf.data_ptr(), _nbytes(buf), src, s))
        if buf is not tensor:
            tensor.copy_(buf)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._rdv.all_gather(obj)

    def synchronize(self) -> None:
        self._check_watchdog()
        self._throttle(0)
        try:
            self._comm.wait(self._stream.cuda_stream, self.timeout_s, self._last_step)
        except RuntimeError as err:
            raise self._fail("synchronize", self._last_step, err) from err

    def abort(self, reason: str = "aborted") -> None:
        self._comm.abort(reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.stop()
        try:
            if self._comm.valid:
                self._throttle(0)
                self._comm.destroy()
        except (RuntimeError, TransportError):
            self._comm.abort()
        self._inflight.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
