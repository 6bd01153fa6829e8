"""`nccl`: a communicator owned by the native library (csrc/nccl_comm.h), between GPUs (DESIGN §1, §5).

The unique id comes from rank 0 through the torch.distributed store. All point-to-point traffic of one exchange
is one ncclGroup of byte sends/receives on a dedicated high-priority communication stream, ordered after the
caller's current stream and before the caller's later work (Note [stream ordering] in csrc/streams.h). The host
keeps at most `max_inflight` exchanges outstanding; waiting on the oldest is where a dead or stalled peer is
noticed: NCCL's asynchronous error, a peer process on this host that exited, or the timeout aborts the
communicator and raises TransportError naming the step, what was awaited and the peer ranks. Capturable into
CUDA graphs once every peer edge has been used eagerly (NCCL connects lazily).

A watchdog thread (as Note [shm watchdog] in shm.py) watches host-visible completion marks that the
communication stream writes after each exchange; when a peer process on this host exited or nothing completed
for `timeout_s`, it aborts the communicator (thread-safe in the native layer), which stops its kernels, so a
host sync outside the transport does not hang; the next transport call raises TransportError naming the step.
Construction, the watchdog's start and close are StreamTransport's (stream.py), shared with shm.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .base import TransportError
from .stream import StreamTransport, nbytes
from .watchdog import WatchdogThread

__all__ = ["NcclTransport"]


def _peers_text(peers: tuple[int, ...]) -> str:
    if not peers:
        return "no peer"
    return ("peer rank " if len(peers) == 1 else "peer ranks ") + ", ".join(map(str, peers))


class _Watchdog(WatchdogThread):
    def __init__(self, owner: NcclTransport, poll_s: float = 0.02):
        super().__init__(owner, "nccl", poll_s)
        self._comm = owner._comm  # only its thread-safe calls: completed, abort
        self._C = owner._C
        self._peer_pids = dict(owner._local_peer_pids)

    def run(self) -> None:
        for head in self.heads():
            step, issued_at, (seq, what, peers) = head
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
                    f"nccl transport on rank {rank}: {what} at step {step} with {_peers_text(peers)}: {problem}; "
                    "the watchdog aborted the communicator, so the data of this step and later ones is invalid"
                )
                self._comm.abort(self.error)
                self.clear()
                return


class NcclTransport(StreamTransport):
    name = "nccl"

    def _setup(self) -> None:
        rank, world_size, timeout_s = self.rank, self.world_size, self.timeout_s
        uid = self._rdv.from_rank0("uid", self._C.nccl_unique_id, "the NCCL unique id (set-up)")
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        try:
            self._comm = self._C.NcclComm(uid, world_size, rank, self.device.index, timeout_s)
        except RuntimeError as err:
            dead = self._dead_peers()
            who = f" ({', '.join(self._rdv.describe_peer(r) for r in dead)})" if dead else ""
            raise TransportError(f"nccl set-up on rank {rank} of {world_size} failed{who}: {err}") from err
        # (step, seq of its completion mark, what, peers), oldest first
        self._inflight: list[tuple[int, int, str, tuple[int, ...]]] = []
        self._seq = 0
        self._last_peers: tuple[int, ...] = ()

    def _resolve_device(self, device: Any) -> torch.device:
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the nccl transport needs a CUDA device, got {dev}; use 'shm' or 'gloo' on CPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def _make_watchdog(self) -> _Watchdog:
        return _Watchdog(self)

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise ValueError(f"nccl transport on {self.device} got a tensor on {t.device}")

    def _context(self, what: str, step: int, peers: tuple[int, ...]) -> str:
        at = f"at step {step}" if step >= 0 else "before the first step"
        return f"nccl {what} {at} between rank {self.rank} of {self.world_size} and {_peers_text(peers)}"

    def _fail(self, what: str, step: int, peers: tuple[int, ...], err: Exception) -> TransportError:
        if self._watchdog_error() is not None:
            return TransportError(f"{self._watchdog_error()} ({what} with {_peers_text(peers)}: {err})")
        dead = self._dead_peers(peers)
        who = f" ({', '.join(self._rdv.describe_peer(r) for r in dead)})" if dead else ""
        return TransportError(f"{self._context(what, step, peers)} failed{who}: {err}")

    def _throttle(self, keep: int) -> None:
        while len(self._inflight) > keep:
            step, seq, what, peers = self._inflight[0]
            t0 = next_check = time.monotonic()
            while not self._comm.completed(seq):
                try:
                    self._comm.check_async(step)
                except RuntimeError as err:
                    raise self._fail(f"wait for {what}", step, peers, err) from err
                now = time.monotonic()
                problem = ""
                if now >= next_check:  # a peer process on this host that exited: no need to wait the timeout
                    dead = self._dead_peers(peers)
                    problem = f"{self._rdv.describe_peer(dead[0])} exited" if dead else ""
                    next_check = now + 0.02
                if not problem and now - t0 > self.timeout_s:
                    problem = f"did not complete within {self.timeout_s:.0f} s: a peer died or stalled"
                if problem:
                    self._comm.abort(f"{what} at step {step} with {_peers_text(peers)}: {problem}")
                    raise TransportError(f"{self._context(what, step, peers)}: {problem}; the communicator was aborted")
                time.sleep(1e-4)
            self._inflight.pop(0)

    def _enqueue(self, what: str, step: int, peers: tuple[int, ...], issue) -> None:
        self._check_open(what, step)
        capturing = torch.cuda.is_current_stream_capturing()
        own_entry = self._admit()
        if not capturing and own_entry:
            self._throttle(self.max_inflight - 1)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            issue(self._stream.cuda_stream)
        except RuntimeError as err:
            raise self._fail(what, step, peers, err) from err
        current.wait_stream(self._stream)
        self._last_step, self._last_peers = step, peers
        if not capturing:
            self._seq += 1
            try:
                self._comm.mark_done(self._stream.cuda_stream, self._seq)
            except RuntimeError as err:
                raise self._fail(what, step, peers, err) from err
            if own_entry or not self._inflight:
                self._inflight.append((step, self._seq, what, peers))
            else:  # a later group of one step (`one_step`): its mark is later on the same stream
                first_step, _, first_what, first_peers = self._inflight[-1]
                self._inflight[-1] = (first_step, self._seq, first_what, first_peers)
            self._watch(step, (self._seq, what, peers))

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        if not sends and not recvs:
            return
        send_list, recv_list, copies = [], [], []
        for peer in sorted(sends):
            for t in sends[peer]:
                self._check(t)
                t = t if t.is_contiguous() else t.contiguous()
                send_list.append((peer, t.data_ptr(), nbytes(t)))
                copies.append(t)  # keep alive until issued
        for peer in sorted(recvs):
            for t in recvs[peer]:
                self._check(t)
                buf = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                recv_list.append((peer, buf.data_ptr(), nbytes(buf)))
                if buf is not t:
                    copies.append((t, buf))
        peers = tuple(sorted(set(sends) | set(recvs)))
        self._enqueue("exchange", step, peers, lambda s: self._comm.sendrecv(send_list, recv_list, s))
        for item in copies:
            if isinstance(item, tuple):
                item[0].copy_(item[1])

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        if self.world_size == 1:
            return
        self._check(tensor)
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        peers = tuple(r for r in range(self.world_size) if r != src) if src == self.rank else (src,)
        what = f"broadcast from rank {src}"
        self._enqueue(what, step, peers, lambda s: self._comm.broadcast(buf.data_ptr(), nbytes(buf), src, s))
        if buf is not tensor:
            tensor.copy_(buf)

    def synchronize(self) -> None:
        self._check_watchdog()
        self._throttle(0)
        try:
            self._comm.wait(self._stream.cuda_stream, self.timeout_s, self._last_step)
        except RuntimeError as err:
            raise self._fail("synchronize", self._last_step, self._last_peers, err) from err

    def abort(self, reason: str = "aborted") -> None:
        self._comm.abort(reason)

    def _close(self) -> None:
        try:
            if self._comm.valid:
                self._throttle(0)
                self._comm.destroy()
        except (RuntimeError, TransportError):
            self._comm.abort()
        self._inflight.clear()
