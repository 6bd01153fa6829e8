"""An exchange whose receiving side waits only where it first reads what arrives (transport/base.py's ordering
contract otherwise): issued on a side stream after the caller's queued work, its completion marked by an
*external* CUDA event, which the consumer's stream waits for at its first read — eagerly, or, inside a CUDA graph
captured there, as an event-wait node, which at every replay waits for the event's record made before the launch.
So a transfer overlaps whatever the next step computes before its first read, also when that step is replayed.
An exchange may come in groups, each with its own event (PatchParallel's K/V, one group per run of layers), so
that a reader waits only for the group it reads and the rest of the transfer overlaps the reads of the first.
A group may also carry *puts* (transport/windows.py): copies straight into peers' mapped buffers, issued on the same
side stream before the group's messages, whose arrival then tells the receiver that the puts landed.

Off CUDA, or where torch has no external events, it is an ordinary exchange (the caller's stream waits at once).
The side stream goes through the transport's own streams, in issue order with every other exchange: a later
exchange the caller's stream waits for (the next step's) also waits for this one.
"""

from __future__ import annotations

import inspect

import torch

from .base import Transport
from .windows import put

__all__ = ["DeferredExchange"]


def external_events() -> bool:
    """Whether this torch makes CUDA events that record and wait as nodes of a captured graph."""
    return "external" in inspect.signature(torch.cuda.Event.__new__).parameters


class DeferredExchange:
    """`exchange` now, in groups; `await_received(g)` where group g's received values are first read."""

    def __init__(self, transport: Transport, device: torch.device, enabled: bool = True, groups: int = 1):
        self.transport, self.device, self.groups = transport, device, max(1, groups)
        self.deferred = enabled and device.type == "cuda" and external_events()
        if self.deferred:
            self._side = torch.cuda.Stream(device)
            self._done = [torch.cuda.Event(external=True) for _ in range(self.groups)]
            # recorded once now: an event never recorded is never created, and a wait on it would not be captured
            for event in self._done:
                event.record(torch.cuda.current_stream(device))

    def exchange(self, step: int, groups: list[tuple[dict, dict, list]]) -> None:
        """Each group (sends, recvs, puts) in order, as one step against the transport's throttle: its puts (dst,
        src) copied, then its messages; group g's completion (its sends read, its receives landed) is event g, and
        implies every earlier group's."""
        if len(groups) != self.groups:
            raise ValueError(f"DeferredExchange made for {self.groups} group(s) got {len(groups)}")
        if not self.deferred:
            with self.transport.one_step():
                for sends, recvs, puts in groups:
                    put(puts)
                    self.transport.exchange(step, sends, recvs)
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))  # after the work that made the sends
        with torch.cuda.stream(self._side), self.transport.one_step():
            for event, (sends, recvs, puts) in zip(self._done, groups):
                put(puts)
                self.transport.exchange(step, sends, recvs)
                event.record(self._side)

    def await_received(self, group: int = -1) -> None:
        """The current stream waits for group `group` of the last exchange (default the last group, so all of
        it): an event-wait node when the stream is being captured."""
        if self.deferred:
            torch.cuda.current_stream(self.device).wait_event(self._done[group])
