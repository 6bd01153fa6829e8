"""Every error class the package raises on purpose, in one place: each names what went wrong and the fix.

`ConfigError`, `PlanError` and `DenoiserError` are raised before any GPU work or communication (bad input,
docs/architecture.md); `TransportError` when a peer died, stalled past the timeout or disagreed, naming the peer and the
step or phase; `TraceError` when the denoiser cannot be traced.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DenoiserError", "PlanError", "TraceError", "TransportError"]


class ConfigError(ValueError):
    """A configuration the runtime refuses before doing any work; the message says what to change."""


class DenoiserError(ValueError):
    """A pipeline, denoiser, scheduler or option the runtime cannot drive."""


class PlanError(ValueError):
    """An explicit plan that cannot be used (unknown module, duplicate, a module and its parent, ...)."""


class TraceError(RuntimeError):
    """The denoiser could not be traced (docs/architecture.md: a clear error before any GPU work)."""


class TransportError(RuntimeError):
    """A peer died, stalled past the timeout, or disagreed; the message names the peer and the step."""
