"""The exchange buffers of one rank: every exchange point's values, of this rank and of the others, in static
double-buffered slots, and the transfers that fill them (DESIGN §10, §12).

An exchange point is one call of one layer in the forward (module name + call index); it holds values in
*regions*: `top` (this patch's top rows, which the patch above needs as its lower halo), `bottom` (its bottom
rows, for the patch below), `kv` (self-attention keys and values, for every patch) and `gn` (GroupNorm moments,
for every patch). The first step of a call signature (always exact: warm_up >= 1) registers the points with
their shapes; after its forward the buffers are laid out flat, one per slot and dtype, region by region, so that
what one peer needs is one or two contiguous spans.

Note [slots]: slot k % 2 receives step k's values: this rank writes its own into `mine[k % 2]` during the forward,
and the others' arrive in `theirs[k % 2][peer]`, either at the point (fresh, blocking) or in the one packed
exchange after the forward (stale: step k+1 reads them). Step k reads stale values from `read_slot` = the slot of
step k-1 (`no_sync`: of step W-1), which nothing writes during step k, so the next exchange never races the
reads. The buffers keep their addresses for the life of a signature, as CUDA-graph capture will need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .modes import StepPolicy

__all__ = ["REGIONS", "PatchExchange"]

REGIONS = ("top", "kv", "gn", "bottom")


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: torch.Size
    offset: int = 0  # elements into the flat buffer of its dtype (set when the layout is frozen)

    @property
    def numel(self) -> int:
        return self.shape.numel()


class PatchExchange:
    """Exchange points and buffers of rank `rank` of `world` patches over `transport`, for one call signature."""

    def __init__(self, rank: int, world: int, transport: Any, device: torch.device):
        self.rank, self.world, self.transport, self.device = rank, world, transport, device
        self.entries: dict[tuple, dict[str, _Entry]] = {}  # point -> region -> entry, in registration order
        self.full_bytes: dict[tuple, int] = {}  # point -> bytes of this patch's whole input (for the report)
        self.frozen = False
        # [slot][point][region] -> own value; [slot][peer][point][region] -> that peer's value
        self.mine: list[dict] = [{}, {}]
        self.theirs: list[dict] = [{q: {} for q in self.peers}, {q: {} for q in self.peers}]
        self._flat_mine: list[dict] = [{}, {}]  # [slot][dtype] -> flat buffer (after freezing)
        self._flat_theirs: list[dict] = [{}, {}]  # [slot][peer][dtype]
        self._spans: dict[torch.dtype, dict[str, tuple[int, int]]] = {}  # dtype -> region -> (start, end)
        self.policy = StepPolicy("full_sync", 1, 0)
        self.read_slot = 0
        self._calls: dict[str, int] = {}
        self._gather: dict | None = None

    @property
    def peers(self) -> list[int]:
        return [q for q in range(self.world) if q != self.rank]

    def wanted_from_me(self, peer: int) -> tuple[str, ...]:
        """Regions `peer` needs of mine: halos only between neighbours, K/V and moments everywhere."""
        return tuple(
            r for r in REGIONS if (r == "top" and peer == self.rank - 1) or (r == "bottom" and peer == self.rank + 1)
            or r in ("kv", "gn")
        )  # fmt: skip

    def wanted_of(self, peer: int) -> tuple[str, ...]:
        """Regions I need of `peer`'s (the mirror of `wanted_from_me` on its side)."""
        return tuple(
            r for r in REGIONS if (r == "bottom" and peer == self.rank - 1) or (r == "top" and peer == self.rank + 1)
            or r in ("kv", "gn")
        )  # fmt: skip

    # ---- steps ----------------------------------------------------------------------------------------------------
    def begin_step(self, policy: StepPolicy) -> None:
        self.policy = policy
        self._calls = {}

    def point(self, name: str) -> tuple:
        """The exchange point of this call of module `name` (a module called twice per forward has two)."""
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        return (name, index)

    def own_slot(self, key: tuple, region: str) -> torch.Tensor | None:
        """Where `share` will put this step's own `region` value at point `key`, for a layer that can make it there
        in place (K/V: one copy fewer of the largest values); None before the layout exists or when this step keeps
        no own values (`no_sync`)."""
        if not self.frozen or not self.policy.writes_own or key not in self.entries:
            return None
        return self.mine[self.policy.step % 2][key].get(region)

    def share(self, key: tuple, own: dict[str, torch.Tensor], fresh: bool, full_bytes: int = 0) -> tuple[dict, dict]:
        """Publish this rank's `own` region values at point `key`; return (own, others): own[region] is this
        rank's value (this step's when fresh, else the stale one), others[region][peer] the peer's value (of
        step k when `fresh`, blocking; else the stale one, Note [slots])."""
        slot = self.policy.step % 2
        if not self.frozen:
            self._register(key, own, full_bytes)
        elif key not in self.entries or any(
            r not in self.entries[key] or self.entries[key][r].shape != v.shape for r, v in own.items()
        ):
            raise RuntimeError(
                f"PatchParallel: exchange point {key[0]} (call {key[1]}) was not seen with these shapes at the first "
                "step of this call signature: the denoiser's control flow changed between steps"
            )
        if self.policy.writes_own:
            for region, value in own.items():
                dst = self.mine[slot][key][region]
                if value.data_ptr() != dst.data_ptr():  # not made in place (`own_slot`)
                    dst.copy_(value)
        if fresh:
            if self.world > 1:
                sends = {q: [self.mine[slot][key][r] for r in own if r in self.wanted_from_me(q)] for q in self.peers}
                recvs = {q: [self.theirs[slot][q][key][r] for r in own if r in self.wanted_of(q)] for q in self.peers}
                self.transport.exchange(self.policy.step, sends, recvs)
            read = slot
        else:
            read = self.read_slot
        others = {r: {q: self.theirs[read][q][key][r] for q in self.peers if r in self.wanted_of(q)} for r in own}
        return {r: self.mine[read][key][r] for r in own}, others

    def end_step(self) -> None:
        """After the forward: the one packed exchange of this step's stale values (Note [slots]); freeze the
        layout after the first step of a signature."""
        slot = self.policy.step % 2
        if not self.frozen:
            self._freeze()
        regions = self.policy.packed_regions
        if regions and self.world > 1:
            sends = {q: self._spans_of(self._flat_mine[slot], self.wanted_from_me(q), regions) for q in self.peers}
            recvs = {q: self._spans_of(self._flat_theirs[slot][q], self.wanted_of(q), regions) for q in self.peers}
            self.transport.exchange(self.policy.step, sends, recvs)
        if self.policy.writes_own:
            self.read_slot = slot

    def prepare_transport(self, regions: tuple[str, ...]) -> None:
        """Size the transport for the packed exchange of `regions` before a CUDA graph bakes its channels in:
        shm replaces a channel that a message outgrows, and a captured op would keep writing the old one."""
        if not self.frozen or self.world == 1 or not regions:
            return
        sends = {q: self._spans_of(self._flat_mine[0], self.wanted_from_me(q), regions) for q in self.peers}
        recvs = {q: self._spans_of(self._flat_theirs[0][q], self.wanted_of(q), regions) for q in self.peers}
        self.transport.prepare({q: v for q, v in sends.items() if v}, {q: v for q, v in recvs.items() if v})

    def gather_rows(self, own: torch.Tensor) -> torch.Tensor:
        """Every patch's output rows on every rank, in row order (axis -2), synchronously."""
        if self.world == 1:
            return own
        own = own.contiguous()
        if self._gather is None or self._gather[self.peers[0]].shape != own.shape:
            self._gather = {q: torch.empty_like(own) for q in self.peers}
        self.transport.exchange(
            self.policy.step, {q: [own] for q in self.peers}, {q: [self._gather[q]] for q in self.peers}
        )
        return torch.cat([own if q == self.rank else self._gather[q] for q in range(self.world)], dim=-2)

    # ---- layout -----------------------------------------------------------------------------------------------------
    def _register(self, key: tuple, own: dict[str, torch.Tensor], full_bytes: int) -> None:
        if key in self.entries:
            raise RuntimeError(f"PatchParallel: exchange point {key} registered twice in one step")
        self.entries[key] = {r: _Entry(v.dtype, v.shape) for r, v in own.items()}
        self.full_bytes[key] = full_bytes
        for slot in (0, 1):  # standalone until the layout is frozen, then views into the flat buffers
            self.mine[slot][key] = {r: torch.empty_like(v) for r, v in own.items()}
            for q in self.peers:
                self.theirs[slot][q][key] = {r: torch.empty_like(v) for r, v in own.items()}

    def _freeze(self) -> None:
        """Lay every point's values out flat, region-major per dtype, and move the first step's values there."""
        sizes: dict[torch.dtype, int] = {}
        for dtype in {e.dtype for entries in self.entries.values() for e in entries.values()}:
            start, spans = 0, {}
            for region in REGIONS:
                begin = start
                for entries in self.entries.values():
                    entry = entries.get(region)
                    if entry is not None and entry.dtype == dtype:
                        entry.offset, start = start, start + entry.numel
                spans[region] = (begin, start)
            self._spans[dtype], sizes[dtype] = spans, start
        for slot in (0, 1):
            self._flat_mine[slot] = self._flatten(self.mine[slot], sizes)
            self._flat_theirs[slot] = {q: self._flatten(self.theirs[slot][q], sizes) for q in self.peers}
        self.frozen = True

    def _flatten(self, values: dict, sizes: dict) -> dict:
        flat = {dtype: torch.zeros(n, dtype=dtype, device=self.device) for dtype, n in sizes.items()}
        for key, regions in values.items():
            for region, old in regions.items():
                entry = self.entries[key][region]
                view = flat[entry.dtype][entry.offset : entry.offset + entry.numel].view(entry.shape)
                view.copy_(old)
                regions[region] = view
        return flat

    def _spans_of(self, flat: dict, wanted: tuple[str, ...], regions: tuple[str, ...]) -> list[torch.Tensor]:
        """The contiguous spans of `flat` holding the wanted regions, merged where adjacent."""
        out = []
        for dtype, spans in self._spans.items():
            runs: list[list[int]] = []
            for region in REGIONS:
                begin, end = spans[region]
                if region not in wanted or region not in regions or begin == end:
                    continue
                if runs and runs[-1][1] == begin:
                    runs[-1][1] = end
                else:
                    runs.append([begin, end])
            out += [flat[dtype][b:e] for b, e in runs]
        return out

    # ---- report -----------------------------------------------------------------------------------------------------
    def bytes_per_step(self, regions: tuple[str, ...] = REGIONS) -> dict[str, int]:
        """Bytes this rank sends per step in `regions` (halos, K/V, moments), what all-gathering every exchanged
        layer's whole input to every peer would send instead ("all_gather"), and what DistriFusion's all-gather
        sends ("distrifusion", `distrifusion_bytes`)."""
        out = {"halo": 0, "kv": 0, "gn": 0}
        for entries in self.entries.values():
            for region, entry in entries.items():
                if region not in regions:
                    continue
                receivers = sum(region in self.wanted_from_me(q) for q in self.peers)
                out["halo" if region in ("top", "bottom") else region] += entry.numel * entry.dtype.itemsize * receivers
        out["all_gather"] = sum(self.full_bytes.values()) * len(self.peers)
        out["distrifusion"] = self.distrifusion_bytes()
        return out

    def distrifusion_bytes(self) -> int:
        """What this rank sends per async step in distrifuser's one all-gather (mit-han-lab/distrifuser,
        modules/pp): every other rank gets, per 3x3 convolution, both boundaries of `padding` rows (ours: only the
        rows a neighbour reads, to that neighbour), per self-attention the patch's whole K and V, per GroupNorm the
        moments (as ours: 2 x batch x groups, in our moment dtype). Our `bottom` region is exactly `padding` rows."""
        total = 0
        for entries in self.entries.values():
            for region, entry in entries.items():
                size = entry.numel * entry.dtype.itemsize
                if region == "bottom":
                    total += 2 * size  # the top boundary has as many rows as the bottom one
                elif region in ("kv", "gn"):
                    total += size
        return total * len(self.peers)
