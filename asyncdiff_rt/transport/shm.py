"""`shm`: page-locked shared host memory between the processes of one host (DESIGN §1, csrc/shm_channel.h).

One native `ShmChannel` per directed peer pair that is used, created by the sender and opened by the receiver,
named `<prefix>_<src>to<dst>_g<generation>`; the prefix comes from rank 0 through the torch.distributed store.
Each channel counts its own messages (its seq), so both sides agree without a global op counter even when a
rank takes part in only some exchanges. A channel grows (a new generation) when a message does not fit; both
sides take the same decision because they see the same sizes in the same order (the Transport contract).

Note [shm generations]: the sender may run ahead of its receiver by several generations (on CPU a send only
waits for a free slot, and a new generation has free slots), while the receiver still has to open the older
ones and read the messages in them. So a sender never unlinks a generation its receiver has not opened: it
keeps the old channel (retired) until `peer_released` (shm: the receiver mapped it), and `close` waits (with the
timeout) for the receiver to open what is left, unless the transport failed. On every failure path (`abort`,
set-up errors, close, exit) this rank's regions are unlinked, so nothing is left in /dev/shm.

On CPU the calls are blocking memcpys. On a GPU they are enqueued on a high-priority communication stream of
this transport, ordered after the caller's current stream and before the caller's later work (Note [stream
ordering] in csrc/streams.h); the host never synchronises in steady state except to keep at most
`max_inflight` exchanges outstanding (those of one `one_step` count once), which is also where a stalled or dead
peer is noticed (the timeout).

Note [slot cap]: a message larger than `slot_bytes` (ASYNCDIFF_RT_SLOT_MB, default 128 MiB, rank 0's value on
every rank) travels as several pieces (pieces.py), each one message of its channel, so a channel's two slots
never exceed twice the cap. Without it a channel grew to its largest message: PatchParallel's K/V (SDXL at 2048 px,
P = 4: 0.84 GB to each of 3 peers) took 1.6 GB of exported device memory per peer pair, 20 GB on one device in the
emulation, and P = 4 did not fit an 80 GB H100. An exchange issues its pieces round by round (piece i to every
peer, then piece i from every peer), so the copy into a slot and the copy out of the other overlap. The one
difference it makes: a send of more than two pieces completes only once its receiver has taken all but the last
two, so its receive must not wait for a later call of the sender (true of every exchange our strategies issue:
each rank issues the same calls in the same order).

Note [shm watchdog]: a GPU stream blocked on a flag that a dead peer will never write would hang whatever host
call waits on that stream next (a `.cpu()`, a synchronize), outside any transport call. A watchdog thread per
GPU transport therefore polls the completion of every outstanding exchange (words the streams write into the
shared header: no CUDA call, which would block behind a synchronous copy in the main thread); when a peer
process exited, marked a channel failed, or nothing completed for `timeout_s`, it marks every channel failed and
writes the awaited flag values from the host until the streams drained. The data of that step is then garbage: the next
transport call (`exchange`, `broadcast`, `synchronize`) raises TransportError naming the step, so callers must
call `synchronize()` before they trust a result (the runtime does, at the end of each pipeline call).
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .base import TransportError
from .pieces import GRANULE, default_slot_bytes, split
from .rendezvous import StoreRendezvous, group_store
from .stream import StreamTransport, nbytes
from .watchdog import WatchdogThread

__all__ = ["ShmTransport", "StoreRendezvous", "group_store"]

_MIN_CAPACITY = GRANULE  # a channel's capacity is a multiple of it (and so is the slot cap, pieces.py)
_open_transports: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:  # a process that exits on an exception still unlinks its regions
    for transport in list(_open_transports):
        transport.abort("the process exited")
        transport.close()


def _round_capacity(nbytes: int) -> int:
    return max(_MIN_CAPACITY, -(-nbytes // _MIN_CAPACITY) * _MIN_CAPACITY)


def _as_device(device: Any) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the shm transport works on cpu or cuda tensors, not {dev}")
    return dev


class _Link:
    """One direction of one peer pair: the native channel, its generation and its message counter."""

    __slots__ = ("channel", "generation", "seq", "retired")

    def __init__(self) -> None:
        self.channel: Any = None
        self.generation = -1
        self.seq = 0
        self.retired: list[Any] = []  # older generations the receiver has not opened yet (sender side)


class _Watchdog(WatchdogThread):
    """Note [shm watchdog]."""

    def __init__(self, owner: ShmTransport, poll_s: float = 0.02):
        super().__init__(owner, owner.name, poll_s)
        self._kind = owner.name

    @staticmethod
    def _done(ops: list[tuple[Any, int]]) -> bool:
        return all(channel.completed(seq) for channel, seq in ops)

    def run(self) -> None:
        for head in self.heads():
            step, issued_at, ops = head
            owner = self._owner()
            if owner is None:
                return
            with owner._channels_lock:  # channels are closed only under this lock (growth)
                done = self._done(ops)
                problem = "" if done else next((p for p in (c.peer_problem() for c in owner._channels()) if p), "")
            if done:
                self.done(head)
                del owner
                continue
            problem = problem or self.stalled(issued_at)
            if problem:
                if self.error is None:
                    self.error = (
                        f"{self._kind} transport on rank {owner.rank}: step {step}: {problem}; the watchdog released "
                        "this rank's streams, so the data of this step and later ones is invalid"
                    )
                self._release(owner)
            del owner

    def _release(self, owner: ShmTransport) -> None:
        deadline = time.monotonic() + 10.0
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            pending = self.pending()
            with owner._channels_lock:
                for c in owner._channels():
                    c.release_from_host()
                if all(self._done(ops) for _, _, ops in pending):
                    break
            time.sleep(1e-3)
        self.clear()


class ShmTransport(StreamTransport):
    name = "shm"
    _channel_type = "ShmChannel"  # the native class of its channels (ipc.py: IpcChannel)

    def _setup(self) -> None:
        self._cuda = self.device.type == "cuda"
        hosts = [host for host, _ in self._where]
        if len(set(hosts)) != 1:
            raise TransportError(
                f"the {self.name} transport needs every rank on one host; ranks run on {hosts}: use transport='nccl'"
            )
        self._peer_pids = [pid for _, pid in self._where]
        self._prefix = self._rdv.from_rank0(
            "prefix",
            lambda: f"adrt{os.getpid()}_{secrets.token_hex(4)}".encode(),
            f"the {self.name} name prefix (set-up)",
        ).decode()
        mine = default_slot_bytes()  # every rank checks its own setting; rank 0's is used (Note [slot cap])
        self.slot_bytes = int(self._rdv.from_rank0("slot", lambda: str(mine).encode(), "the slot cap (set-up)"))
        self._send: dict[int, _Link] = {}
        self._recv: dict[int, _Link] = {}
        # Sends (D2H) and receives (H2D) on two streams, so the two copy directions overlap.
        self._send_stream = torch.cuda.Stream(self.device, priority=-1) if self._cuda else None
        self._recv_stream = torch.cuda.Stream(self.device, priority=-1) if self._cuda else None
        self._inflight: list[tuple[int, list[tuple[_Link, int]]]] = []  # (step, [(link, seq)]) oldest first
        self._channels_lock = threading.Lock()  # channel replacement vs. the watchdog
        self._failed = False
        _open_transports.add(self)

    def _resolve_device(self, device: Any) -> torch.device:
        return _as_device(device)

    def _make_watchdog(self) -> _Watchdog:
        return _Watchdog(self)

    # -- channels -----------------------------------------------------------------------------------------------
    def _link(self, peer: int, sending: bool, nbytes: int) -> _Link:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: invalid {self.name} peer {peer} (world size {self.world_size})")
        table = self._send if sending else self._recv
        link = table.setdefault(peer, _Link())
        if link.retired and not (self._cuda and torch.cuda.is_current_stream_capturing()):
            self._prune(link)  # closing a channel waits for its GPU work and unregisters memory: not in a capture
        if link.channel is not None and link.channel.capacity >= nbytes:
            return link
        link.generation += 1
        src, dst = (self.rank, peer) if sending else (peer, self.rank)
        name = f"{self._prefix}_{src}to{dst}_g{link.generation}"
        if link.channel is not None and self._cuda:
            try:
                link.channel.wait(link.seq, self.timeout_s)
            except RuntimeError as err:
                raise self._fail(f"set-up of channel {name}", peer, link.seq, err) from err
        index = self.device.index if self._cuda else -1
        try:
            channel = getattr(self._C, self._channel_type)(
                name, _round_capacity(nbytes), sending, index, peer, self.timeout_s, self._peer_pids[peer]
            )
        except RuntimeError as err:
            role = "sending to" if sending else "receiving from"
            what = f"set-up of channel {name} (generation {link.generation}, {role})"
            raise self._fail(what, peer, link.seq + 1, err) from err
        with self._channels_lock:
            old, link.channel = link.channel, channel
            if old is not None:
                self._retire(link, old, sending)
        return link

    def _retire(self, link: _Link, old: Any, sending: bool) -> None:
        """A channel replaced by a new generation (under the channels lock)."""
        if sending and not old.peer_released:
            link.retired.append(old)  # Note [shm generations]
        else:
            old.close()

    def _prune(self, link: _Link) -> None:
        """Close the retired generations the receiver has opened (or that failed)."""
        with self._channels_lock:
            keep = []
            for c in link.retired:
                if c.peer_released or c.failed:
                    c.close()
                else:
                    keep.append(c)
            link.retired = keep

    def _channels(self) -> list[Any]:
        out = []
        for link in itertools.chain(self._send.values(), self._recv.values()):
            out += link.retired + ([link.channel] if link.channel is not None else [])
        return out

    def _check(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t.device.type != self.device.type or (self._cuda and t.device != self.device):
                raise ValueError(f"{self.name} transport on {self.device} got a tensor on {t.device}")

    def prepare(self, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        self._size_links(self._pieces(sends), self._pieces(recvs))

    def _pieces(self, tensors: dict[int, list[torch.Tensor]]) -> dict[int, list[list[tuple[int, int]]]]:
        """Each peer's message as pieces that fit one slot (Note [slot cap])."""
        return {p: split([(t.data_ptr(), nbytes(t)) for t in ts], self.slot_bytes) for p, ts in tensors.items()}

    def _size_links(self, sends: dict[int, list], recvs: dict[int, list]) -> None:
        # Send channels first: opening a receive channel waits for its creator, who creates its sends first.
        for table, sending in ((sends, True), (recvs, False)):
            for peer in sorted(table):
                self._link(peer, sending, max(self._C.ShmChannel.packed_size(piece) for piece in table[peer]))

    # -- data movement ------------------------------------------------------------------------------------------
    def _fail(self, what: str, peer: int, step: int, err: Exception) -> TransportError:
        # Fail every channel, not only this one: peers' waits raise at once instead of timing out, and this
        # rank's streams blocked on other channels are released. The native message counts the channel's own
        # messages ("step" there is the channel seq).
        self.abort(f"rank {self.rank} failed at step {step}: {err}")
        if self._watchdog_error() is not None:
            return TransportError(f"{self._watchdog_error()} ({what} with peer rank {peer}: {err})")
        return TransportError(
            f"{self.name} {what} at step {step} between rank {self.rank} and peer rank {peer} failed: {err}; "
            f"this rank's {self.name} regions were unlinked"
        )

    def _issue(self, what: str, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]):
        self._check_open(what, step)
        self._check(t for ts in sends.values() for t in ts)
        self._check(t for ts in recvs.values() for t in ts)
        # Sends read contiguous views (a copy where needed, made on the caller's stream before the fork).
        send_parts = {p: [t if t.is_contiguous() else t.contiguous() for t in ts] for p, ts in sends.items()}
        recv_bufs = {
            p: [t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]
            for p, ts in recvs.items()
        }
        send_pieces, recv_pieces = self._pieces(send_parts), self._pieces(recv_bufs)
        self._size_links(send_pieces, recv_pieces)
        self._last_step = step
        own_entry = self._admit()
        if not self._cuda:
            self._run(what, step, send_pieces, recv_pieces, 0, 0, None)
        else:
            capturing = torch.cuda.is_current_stream_capturing()
            if not capturing and own_entry:
                self._throttle(self.max_inflight - 1)
            current = torch.cuda.current_stream(self.device)
            # Receives overwrite tensors the caller's queued work may still read: they wait for it too.
            self._send_stream.wait_stream(current)
            self._recv_stream.wait_stream(current)
            issued: list[tuple[_Link, int]] = []
            self._run(
                what,
                step,
                send_pieces,
                recv_pieces,
                self._send_stream.cuda_stream,
                self._recv_stream.cuda_stream,
                issued,
            )
            current.wait_stream(self._send_stream)
            current.wait_stream(self._recv_stream)
            if not capturing and issued:
                if own_entry or not self._inflight:
                    self._inflight.append((step, issued))
                else:  # a later group of one step (`one_step`)
                    self._inflight[-1][1].extend(issued)
                self._watch(step, [(link.channel, seq) for link, seq in issued])
        for peer, ts in recvs.items():
            for t, buf in zip(ts, recv_bufs[peer]):
                if buf is not t:
                    t.copy_(buf)

    def _run(self, what, step, sends, recvs, send_stream: int, recv_stream: int, issued: list | None):
        """Issue every peer's pieces round by round: piece i to every peer, then piece i from every peer (Note
        [slot cap]); `issued` gets each link's last seq (its completion implies the earlier ones')."""
        rounds = max((len(pieces) for pieces in itertools.chain(sends.values(), recvs.values())), default=0)
        for i in range(rounds):
            for table, links, stream, op in (
                (sends, self._send, send_stream, "send"),
                (recvs, self._recv, recv_stream, "recv"),
            ):
                for peer in sorted(table):
                    if i >= len(table[peer]):
                        continue
                    link = links[peer]
                    link.seq += 1
                    try:
                        getattr(link.channel, op)(link.seq, table[peer][i], stream)
                    except RuntimeError as err:
                        raise self._fail(what, peer, step, err) from err
        if issued is not None:
            issued += [(self._send[p], self._send[p].seq) for p in sorted(sends)]
            issued += [(self._recv[p], self._recv[p].seq) for p in sorted(recvs)]

    def _throttle(self, keep: int) -> None:
        """Host-wait (with the timeout) until at most `keep` GPU exchanges are outstanding."""
        while len(self._inflight) > keep:
            step, issued = self._inflight.pop(0)
            for link, seq in issued:
                try:
                    link.channel.wait(seq, self.timeout_s)
                except RuntimeError as err:
                    raise self._fail("wait", link.channel.peer, step, err) from err

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        self._issue("exchange", step, sends, recvs)

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        if self.world_size == 1:
            return
        if src == self.rank:
            self._issue("broadcast", step, {p: [tensor] for p in range(self.world_size) if p != src}, {})
        else:
            self._issue("broadcast", step, {}, {src: [tensor]})

    def message_counters(self) -> Any:
        return {(True, p): link.seq for p, link in self._send.items()} | {
            (False, p): link.seq for p, link in self._recv.items()
        }

    def restore_message_counters(self, counters: Any) -> None:
        # A captured op is not seen by the native channel (no seq check, no event): only these counters moved.
        for (sending, peer), seq in counters.items():
            (self._send if sending else self._recv)[peer].seq = seq

    def synchronize(self) -> None:
        self._check_watchdog()
        if self._cuda:
            self._throttle(0)  # every eagerly issued op, with the timeout
            self._check_watchdog()
        else:
            for channel in self._channels():
                if channel.failed:
                    raise TransportError(f"{self.name} channel {channel.name} with peer rank {channel.peer} failed")

    def abort(self, reason: str = "aborted") -> None:
        """Mark every channel failed (peers' waits raise at once), release this rank's blocked streams and
        unlink this rank's regions."""
        self._failed = True
        with self._channels_lock:
            for channel in self._channels():
                channel.abort(reason)

    def _close(self) -> None:
        _open_transports.discard(self)
        failed = self._failed or self._watchdog_error() is not None
        deadline = time.monotonic() + self.timeout_s
        # Receives first: an ipc sender frees its device slots only once the receiver closed its mapping of them
        # (Note [ipc teardown] in csrc/channel_header.h), so every rank closes what it maps before what it exports.
        for link in itertools.chain(self._recv.values(), self._send.values()):
            for channel in link.retired + ([link.channel] if link.channel is not None else []):
                if not failed and not channel.wait_peer_opened(max(0.0, deadline - time.monotonic())):
                    failed = True  # Note [shm generations]: the receiver never came; stop waiting for the others
                channel.close()  # waits for its enqueued GPU work (with the timeout), unmaps, unlinks (creator)
            link.channel, link.retired = None, []
        self._inflight.clear()
