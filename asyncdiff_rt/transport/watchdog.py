"""The bookkeeping both GPU transports' watchdog threads share (Note [shm watchdog] in shm.py): a queue of
issued exchanges, oldest first, that a daemon thread polls every `poll_s` for completion, a dead peer or
`timeout_s` without progress. Subclasses say what "completed" means and what to do about a problem."""

from __future__ import annotations

import collections
import threading
import time
import weakref
from typing import Any

__all__ = ["WatchdogThread"]


class WatchdogThread(threading.Thread):
    def __init__(self, owner: Any, kind: str, poll_s: float = 0.02):
        super().__init__(name=f"asyncdiff_rt-{kind}-watchdog-r{owner.rank}", daemon=True)
        self._owner = weakref.ref(owner)
        self._events: collections.deque = collections.deque()  # (step, issued at, what to poll)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self.poll_s = poll_s
        self.timeout_s = owner.timeout_s
        self.error: str | None = None

    def watch(self, step: int, item: Any) -> None:
        with self._lock:
            self._events.append((step, time.monotonic(), item))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=30)

    def heads(self):
        """Yield the oldest watched exchange, once per poll period, until stopped."""
        while not self._stop_event.wait(self.poll_s):
            with self._lock:
                head = self._events[0] if self._events else None
            if head is not None:
                yield head

    def done(self, head: tuple) -> None:
        with self._lock:
            if self._events and self._events[0] is head:
                self._events.popleft()

    def pending(self) -> list[tuple]:
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def stalled(self, issued_at: float) -> str:
        return (
            f"no progress for {self.timeout_s:g} s (a peer stalled)"
            if time.monotonic() - issued_at > self.timeout_s
            else ""
        )
