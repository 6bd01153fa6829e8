"""An exchange whose receiving side waits only where it first reads what arrives (transport/base.py's ordering
contract otherwise): issued on a side stream after the caller's queued work, its completion marked by an
*external* CUDA event, which the consumer's stream waits for at its first read — eagerly, or, inside a CUDA graph
captured there, as an event-wait node, which at every replay waits for the event's record made before the launch.
So a transfer overlaps whatever the next step computes before its first read, also when that step is replayed.

Off CUDA, or where torch has no external events, it is an ordinary exchange (the caller's stream waits at once).
The side stream goes through the transport's own streams, in issue order with every other exchange: a later
exchange the caller's stream waits for (the next step's) also waits for this one.
"""

from __future__ import annotations

import inspect

import torch

from .base import Transport

__all__ = ["DeferredExchange"]


def external_events() -> bool:
    """Whether this torch makes CUDA events that record and wait as nodes of a captured graph."""
    return "external" in inspect.signature(torch.cuda.Event.__new__).parameters


class DeferredExchange:
    """`exchange` now, `await_received` where the received values are first read (once per use)."""

    def __init__(self, transport: Transport, device: torch.device, enabled: bool = True):
        self.transport, self.device = transport, device
        self.deferred = enabled and device.type == "cuda" and external_events()
        if self.deferred:
            self._side = torch.cuda.Stream(device)
            self._done = torch.cuda.Event(external=True)
            # recorded once now: an event never recorded is never created, and a wait on it would not be captured
            self._done.record(torch.cuda.current_stream(device))

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        if not self.deferred:
            self.transport.exchange(step, sends, recvs)
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))  # after the work that made the sends
        with torch.cuda.stream(self._side):
            self.transport.exchange(step, sends, recvs)
        self._done.record(self._side)

    def await_received(self) -> None:
        """The current stream waits for the last exchange (an event-wait node when it is being captured)."""
        if self.deferred:
            torch.cuda.current_stream(self.device).wait_event(self._done)
