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
from ..transport.select import choose_auto
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
        cfg_parallel: bool = False,
        config: dict[str, Any] | None = None,
    ):
        self.pipe, self.device, self.timeout_s = pipe, device, timeout_s
        self.cfg_parallel = cfg_parallel
        self.transport_name = resolve_transport(transport, device)
        self.requested_transport = transport
        self.partner: int | None = None  # CFG parallel: the global rank computing the other guidance half
        self.half = 0
        self.world = None  # every rank of the group (CFG parallel: both halves); `transport` is this half's
        local = self.transport_name == "local"
        if not cfg_parallel and (local or (world_needed == 1 and group is None and not dist_ready())):
            self.transport_name = "local"
            self.transport = make_transport("local", device, None, timeout_s)
            self.world = self.transport
            self.rank, self.world_size = 0, 1
            self.rank_views = list(range(world_needed))
        else:
            self._join(world_needed, group, timeout_s, what, rule, config or {})
        self._call_hook: CallHook | None = None
        self._saved_progress: dict | None = None
        self._call_params: set[str] = set()

    def _join(self, world_needed: int, group: Any, timeout_s: float, what: str, rule: str, config: dict) -> None:
        """One process per rank; with CFG parallel two halves of `inner` ranks each, or of one process running
        every segment (`local` segments), the halves joined rank to rank by `partner`."""
        local = self.transport_name == "local"
        cross = resolve_transport("auto", self.device) if local else self.transport_name
        auto = local or self.requested_transport == "auto"  # the transport between processes is auto's choice
        ensure_process_group(self.device, timeout_s, "auto" if auto else cross)
        import torch.distributed as dist

        world = dist.get_world_size(group)
        self._agree_early(config, group)
        inner = 1 if local else world_needed
        needed = 2 * inner if self.cfg_parallel else world_needed
        if world != needed:
            if self.cfg_parallel:
                rule = f"2 x ({rule})" if not local else "2: one process per guidance half"
            raise ConfigError(
                f"{what}{', cfg_parallel=True' if self.cfg_parallel else ''} needs {needed} processes ({rule}) but the "
                f"group has {world}: launch with `torchrun --nproc_per_node={needed}`, pass group= with {needed} "
                "ranks, or use transport='local'"
            )
        if auto and self.device.type == "cuda":
            cross, why = choose_auto(self.device, group, timeout_s, fallback=cross)
            log.info("asyncdiff_rt: transport='auto' between processes: %s (%s)", cross, why)
            if not local:
                self.transport_name = cross
        if not self.cfg_parallel:
            self.transport = self.world = make_transport(self.transport_name, self.device, group, timeout_s)
            self.rank, self.world_size = self.transport.rank, self.transport.world_size
            self.rank_views = [self.rank]
            return
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        me = ranks.index(dist.get_rank())
        self.half, inner_rank = divmod(me, inner)
        halves = [ranks[:inner], ranks[inner:]]
        sub = [dist.new_group(h, backend="gloo" if cross != "nccl" else None) for h in halves] if not local else None
        self.world = make_transport(cross, self.device, group, timeout_s)
        self.partner = (self.world.rank + inner) % world  # rank in the world transport
        if local:
            self.transport = make_transport("local", self.device, None, timeout_s)
            self.rank, self.world_size = 0, 1
            self.rank_views = list(range(world_needed))
        else:
            self.transport = make_transport(self.transport_name, self.device, sub[self.half], timeout_s)
            self.rank, self.world_size = self.transport.rank, self.transport.world_size
            assert self.rank == inner_rank
            self.rank_views = [self.rank]

    def _agree_early(self, config: dict, group: Any) -> None:
        """Before sizes are checked: ranks that disagree on the configuration would each expect another world and
        wait for peers that never come; compare it over the process group itself first."""
        if not config:
            return
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl" and self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # NCCL's object gather stages through the current device
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, config, group=group)
        for key in config:
            values = [e.get(key) for e in everyone]
            if any(v != values[0] for v in values):
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ConfigError(f"ranks disagree on {key} ({per_rank}): every rank must be configured alike")

    @property
    def distributed(self) -> bool:
        """More than one process takes part (this half's ranks, or the two CFG halves)."""
        return self.world is not None and self.world.world_size > 1

    @property
    def global_rank(self) -> int:
        return self.world.rank if self.world is not None else 0

    # ------------------------------------------------------------------------------------------ set-up
    def decide_on_rank0(self, decide: Callable[[], str], what: str) -> str:
        """Rank 0 runs `decide` and every rank gets its text, or every rank raises alike (none left waiting)."""
        if self.global_rank == 0:
            try:
                decided = ("ok", decide())
            except Exception as err:  # noqa: BLE001 - reported on every rank
                log.exception("asyncdiff_rt: %s failed on rank 0", what)
                decided = ("error", f"{type(err).__name__}: {err}")
        else:
            decided = None
        status, text = self.world.broadcast_object(decided, src=0, phase=f"set-up: {what} on rank 0")
        if status != "ok":
            raise ConfigError(f"rank 0 could not {what}: {text}")
        return text

    def agree(self, mine: dict[str, Any], when: str = "") -> None:
        """Every rank's `mine` must be equal; name the first key that differs, per rank."""
        everyone = self.world.all_gather_object(mine, phase="set-up agreement: plan, dtype, device, configuration")
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
            draw = random.randrange(2**63) if self.global_rank == 0 else None
            seed = self.world.broadcast_object(draw, src=0, phase="call set-up: agreement on the starting noise")
            kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        if self.global_rank != 0 and self.accepts("output_type"):
            kwargs["output_type"] = "latent"  # only rank 0 decodes (documented)
        if self.global_rank != 0 and hasattr(self.pipe, "set_progress_bar_config"):
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
        if self.world is not self.transport and self.world is not None:
            self.world.close()
