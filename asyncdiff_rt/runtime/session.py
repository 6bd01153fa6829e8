"""The session: what every strategy shares between its ranks, written once (docs/architecture.md).

It chooses the ranks (one process per rank over a process group, or every rank view in this process with the
`local` transport), builds the transport, lets rank 0 decide what must be decided once (the plan) and has every
rank agree on what must be equal (plan hash, dtype, device type, configuration), and brackets every pipeline call
with the per-call guarantees: state reset, the same starting noise on every rank, only rank 0 decodes, the
progress bar on rank 0 only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..transport import ensure_process_group, make_transport
from ..transport import resolve as resolve_transport
from .hooks import CallHook

__all__ = ["Session", "dist_ready"]

log = logging.getLogger("asyncdiff_rt")


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class Session:
    """Ranks, transport and per-call guards of one attached strategy instance.

    `world_needed` is the number of ranks the strategy runs on; `what` names the configuration in errors
    (e.g. "model_n=2, stride=1"). With `local`, `rank_views` lists every rank this process plays.
    """

    def __init__(
        self,
        pipe: Any,
        device: torch.device,
        world_needed: int,
        transport: str,
        group: Any,
        timeout_s: float,
        what: str,
        rule: str,
    ):
        self.pipe, self.device, self.timeout_s = pipe, device, timeout_s
        self.transport_name = resolve_transport(transport, device)
        if self.transport_name == "local" or (world_needed == 1 and group is None and not dist_ready()):
            self.transport_name = "local"
            self.transport = make_transport("local", device, None, timeout_s)
            self.rank, self.world_size = 0, 1
            self.rank_views = list(range(world_needed))
        else:
            ensure_process_group(device, timeout_s, self.transport_name)
            import torch.distributed as dist

            world = dist.get_world_size(group)
            if world != world_needed:
                raise ConfigError(
                    f"{what} needs {world_needed} processes ({rule}) but the group has {world}: launch with "
                    f"`torchrun --nproc_per_node={world_needed}`, pass group= with {world_needed} ranks, "
                    "or use transport='local'"
                )
            self.transport = make_transport(self.transport_name, device, group, timeout_s)
            self.rank, self.world_size = self.transport.rank, self.transport.world_size
            self.rank_views = [self.rank]
        self._call_hook: CallHook | None = None
        self._saved_progress: dict | None = None
        self._call_params: set[str] = set()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------ set-up
    def decide_on_rank0(self, decide: Callable[[], str], what: str) -> str:
        """Rank 0 runs `decide` and every rank gets its text, or every rank raises alike (none left waiting)."""
        if self.rank == 0:
            try:
                decided = ("ok", decide())
            except Exception as err:  # noqa: BLE001 - reported on every rank
                log.exception("asyncdiff_rt: %s failed on rank 0", what)
                decided = ("error", f"{type(err).__name__}: {err}")
        else:
            decided = None
        status, text = self.transport.broadcast_object(decided, src=0)
        if status != "ok":
            raise ConfigError(f"rank 0 could not {what}: {text}")
        return text

    def agree(self, mine: dict[str, Any], when: str = "") -> None:
        """Every rank's `mine` must be equal; name the first key that differs, per rank."""
        everyone = self.transport.all_gather_object(mine)
        for key in mine:
            values = [e.get(key) for e in everyone]
            if any(v != values[0] for v in values):
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ConfigError(f"ranks disagree on {key}{when} ({per_rank}): every rank must be configured alike")

    # ------------------------------------------------------------------------------------------ calls
    def install(self, before: Callable[[dict], dict], after: Callable[[bool], None]) -> None:
        """Bracket every pipeline call: the strategy's `before(kwargs)` (its checks: before any collective call)
        then the session's guards; at the end the strategy's `after(ok)`, then the session's."""
        import inspect

        self._call_params = set(inspect.signature(type(self.pipe).__call__).parameters)

        def before_call(kwargs: dict) -> dict:
            return self._begin_call(before(kwargs))

        def after_call(ok: bool) -> None:
            try:
                after(ok)
            finally:
                self._end_call()

        self._call_hook = CallHook(self.pipe, before_call, after_call)

    def accepts(self, name: str) -> bool:
        return name in self._call_params

    def _begin_call(self, kwargs: dict) -> dict:
        if not self.distributed:
            return kwargs
        if self.accepts("generator") and kwargs.get("generator") is None and kwargs.get("latents") is None:
            # every rank must start from the same noise: rank 0 draws the seed
            seed = self.transport.broadcast_object(random.randrange(2**63) if self.rank == 0 else None, src=0)
            kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        if self.rank != 0 and self.accepts("output_type"):
            kwargs["output_type"] = "latent"  # only rank 0 decodes (documented)
        if self.rank != 0 and hasattr(self.pipe, "set_progress_bar_config"):
            self._saved_progress = dict(getattr(self.pipe, "_progress_bar_config", {}))
            self.pipe.set_progress_bar_config(**{**self._saved_progress, "disable": True})
        return kwargs

    def _end_call(self) -> None:
        if self._saved_progress is not None:
            self.pipe._progress_bar_config = self._saved_progress
            self._saved_progress = None

    def close(self) -> None:
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = None
        self.transport.close()
