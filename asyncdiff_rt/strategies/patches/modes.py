"""The sync modes of displaced patch parallelism (DESIGN §10): at step k, where each kind of exchanged value
comes from. One table, read by the layers (what to combine) and by the exchange (what to send, and when).

Note [fresh and stale]: a *fresh* value is of step k and is exchanged at its point, blocking (warm-up steps k < W,
`full_sync` always, and GroupNorm moments under `sync_gn`); a *stale* value is of step k-1 and was exchanged in the
one packed exchange after step k-1's forward (see exchange.py, Note [slots]). `no_sync` reads the values of step
W-1 for ever after; `naive` exchanges nothing, ever.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SYNC_MODES", "StepPolicy"]

SYNC_MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync", "naive")
# regions whose values the packed exchange after a steady-state step carries, per mode (exchange.REGIONS)
_PACKED = {
    "corrected_async_gn": ("top", "kv", "gn", "bottom"),
    "stale_gn": ("top", "kv", "gn", "bottom"),
    "sync_gn": ("top", "kv", "bottom"),  # moments went fresh at their points
    "separate_gn": ("top", "kv", "bottom"),
}


@dataclass(frozen=True)
class StepPolicy:
    """What step `step` of a call does under `sync_mode` with `warm_up` exact steps."""

    sync_mode: str
    warm_up: int
    step: int

    @property
    def exact(self) -> bool:
        return self.sync_mode != "naive" and (self.step < self.warm_up or self.sync_mode == "full_sync")

    @property
    def halo_source(self) -> str:
        """Halos and other patches' K/V: "none" (own rows only), "fresh" or "stale"."""
        if self.sync_mode == "naive":
            return "none"
        return "fresh" if self.exact else "stale"

    @property
    def norm_rule(self) -> str:
        """GroupNorm moments: "exact" (fresh mean over patches), "own", "corrected" or "stale"."""
        if self.exact or self.sync_mode == "sync_gn":
            return "exact"
        if self.sync_mode in ("separate_gn", "no_sync", "naive"):
            return "own"
        return "corrected" if self.sync_mode == "corrected_async_gn" else "stale"

    @property
    def writes_own(self) -> bool:
        """Whether this step's own values go into the exchange buffers (`no_sync` keeps step W-1's there)."""
        return self.sync_mode != "naive" and not (self.sync_mode == "no_sync" and self.step >= self.warm_up)

    @property
    def packed_regions(self) -> tuple[str, ...]:
        """Regions the packed exchange after this step's forward carries (none on exact steps: all went fresh)."""
        return () if self.exact else _PACKED.get(self.sync_mode, ())
