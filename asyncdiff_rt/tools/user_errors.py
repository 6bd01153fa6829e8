"""Which failures the command line reports as one line, and that line.

Why: the errors we raise on purpose (asyncdiff_rt.errors, argument checks) already say what went wrong and what
to change; a traceback around them only hides the message, and with worker processes it came once per rank. An
unexpected exception is a bug: it keeps its traceback (once, from the first rank that failed).
"""

from __future__ import annotations

from ..errors import ConfigError, DenoiserError, PlanError, TraceError, TransportError
from .launch import WorkerError

__all__ = ["USER_ERRORS", "is_user_error", "worker_message", "worker_is_user_error"]

# ValueError covers our argument checks (ConfigError, DenoiserError and PlanError are ValueErrors too).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DenoiserError, PlanError, TraceError, TransportError)
_USER_ERROR_NAMES = {c.__name__ for c in USER_ERRORS} | {"ValueError", "OSError", "FileNotFoundError", "SystemExit"}
_TRACEBACK = "\nTraceback (most recent call last):"


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, (*USER_ERRORS, ValueError))


def _first_failure(err: WorkerError) -> tuple[int, str]:
    # a rank that raised says why; the others often only died because it did (a closed socket, a timeout)
    raised = {r: m for r, m in err.errors.items() if _TRACEBACK in m}
    rank = min(raised or err.errors)
    return rank, err.errors[rank]


def worker_is_user_error(err: WorkerError) -> bool:
    """The first failing rank raised one of ours, or died / timed out (nothing to show but the line)."""
    _, message = _first_failure(err)
    if _TRACEBACK not in message:
        return True
    return message.split(":", 1)[0] in _USER_ERROR_NAMES


def worker_message(err: WorkerError, traceback: bool = False) -> str:
    """The first failing rank's message, once: ``rank R: Type: message`` (plus its traceback if asked)."""
    rank, message = _first_failure(err)
    head, _, tb = message.partition(_TRACEBACK)
    if message.startswith("SystemExit: "):  # a worker's SystemExit carries a message meant for the user as is
        head = head[len("SystemExit: ") :]
    others = len(err.errors) - 1
    text = f"rank {rank}: {head.strip()}"
    if others:
        text += f" ({others} other rank(s) failed too)"
    if traceback and tb:
        text += "\n" + _TRACEBACK.strip() + tb.rstrip()
    return text
