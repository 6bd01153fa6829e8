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

Note [kv slots]: self-attention reads every patch's keys and values as one tensor, so K/V are not laid out with the
other regions: each point holds one buffer (2, batch, P, tokens, inner) whose part [:, :, p] is patch p's (this
rank's part is its `mine`, the others' their `theirs`, in both slots: K/V are not double buffered), and attention
reads K = buffer[0] and V = buffer[1] whole as (batch, P x tokens, inner), the layout a concatenation of the
patches' would have, with no concatenation. K/V-major with the batch outside the patches so that each projection's
GEMM per batch row writes one contiguous (tokens, inner) block, and a part travels as 2 x batch contiguous blocks
(`_pieces`); the patch-major layout before it (P, tokens, batch, 2, inner) made attention and the GEMMs 6 to 30 %
slower than the concatenation (benchmarks/results/patch_attention_NVIDIA_H200.md).
One buffer, not one per slot: K/V are every patch's whole keys and values (SDXL at 2048 px: 3.4 GB per rank, as
much as the UNet's weights), and a second copy kept P = 4 from fitting one 80 GB device in the emulation. It is
safe because nothing writes a part while it is still read or sent: an exact step writes its own part and receives
the others' at the point (its forward first waits for any K/V still in flight, Note [deferred K/V]); a stale step
reads the others' parts, which the closing exchange after it overwrites only once the forward is done (the
transport's streams wait for the caller's), and writes its own part only after the K/V sent after the previous
step have left (`kv_buffer` waits for the point's transfer group before its projection writes, Note [K/V groups]).
Own K/V are always fresh, so the own part is never read stale.

Note [dtype order]: the packed exchange sends each dtype's spans one after the other, and the receiver unpacks them
in its own order, so every rank must lay the dtypes out in the same order: by name, not in the iteration order of a
set of dtypes, which follows their hashes (their addresses, different in every process). In half precision the
halos are float16 and the moments float32, and until 2026-12-03 the set's order decided per process: ranks that
disagreed read each other's halos as moments from the first step that reads the packed exchange (W + 1), non-finite
in about half of the P = 2 launches and most of the P = 4 ones, whatever the path; float32 runs (the CPU tests)
have one dtype and never showed it.

Note [deferred K/V]: K/V are most of what a stale step sends (SDXL 2048 px, P = 2: 1.68 GB of 1.69), and the next
step first reads them at its first self-attention, after the outermost resnets; halos and moments are read at
once. So the closing exchange after step k is two: the output rows with the halos and moments, which the caller's
stream waits for (the pipeline needs ε), then K/V on a side stream (transport/deferred.py), which step k+1 waits
for at its K/V accesses, before the projections write their own parts, also as nodes of its CUDA graph.
That wait also orders step k+1's own K/V writes after the send of the part they overwrite, and the next closing
exchange after this one (the transports' streams run in issue order). On by default (graphs.OVERLAP_ENV=0: the
caller's stream waits for K/V at once). A forward with exchanges at its points (exact steps, `sync_gn`) waits for
the deferred K/V before it starts (`await_deferred`): replayed from a graph, its channel ops would otherwise run
beside the transfer on the same channels (a captured op keeps the slot parity of its capture and is ordered only by
the graph, not behind the eager ops on the transport's streams) — the cuda tier's `sync_gn` graphs differed from
eager by 0.1 without it (H200, 2026-12-03; the cuda tier passes with it).

Note [K/V groups]: the deferred K/V may go as several exchanges of consecutive points (`kv_runs`, about
ASYNCDIFF_RT_PATCH_KV_GROUPS of them, default 1, agreed by every rank), each completing its own event, so that step
k+1's first access to a point of group g waits for group g only and the later layers' transfer runs beside the
earlier layers' compute. Measured with 8 groups (H200, 2026-12-07, 2048 px, P = 4): 236.3 ms per step against 235.2
with one, so the wait for the one transfer was not what made the step 1.09x no_sync's, and the default stays one
(benchmarks/README.md). The groups of one step are one entry of the transport's throttle (`Transport.one_step`): a
host wait between them would hold the host at the GPU's pace.

Note [K/V puts]: through the exchange slots every K/V byte is copied twice (into the slot, then out of it into the
receiver's buffer): at 2048 px, P = 4, 2.5 GB to and from each rank per step, beside the compute on the one HBM of
the emulation. Where the transport can map its peers' memory (transport/windows.py: `ipc` on CUDA, `shm` on the
CPU), every rank's K/V buffers are carved out of one window that its peers map, and this rank's K/V part is copied
straight into each peer's buffer (puts, one copy per byte), then each peer gets one small message behind them on
the same stream: a stale step's closing exchange does so per K/V group (the message's arrival completes the group's
event, Note [K/V groups]), an exact step at each K/V point (awaited there, like the fresh K/V it replaces). Safe with
the one buffer of Note [kv slots] by two orderings: a put overwrites this rank's part in the peer's buffer, which the
peer last read in its forward of the step the put follows or of the one before, and every put is issued after this
rank received that forward's output rows (the closing rows exchange, which a later stream op of this rank follows),
which the peer sends only after the forward; and the peer reads a put only after its message arrived (`kv_buffer`,
the point's exchange, or `await_deferred` before an exact forward). Agreed by every rank (PatchParallel);
ASYNCDIFF_RT_PATCH_KV_PUTS=0 keeps the slots. Measured (H100, 2026-12-08, 2048 px, P = 4, emulated): 234.9 ms per
corrected_async_gn step against 241.1 ms through the slots in the same call; bitwise the slots' values (cuda tier).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from ...transport.deferred import DeferredExchange
from ...transport.windows import PeerWindows, put
from .graphs import overlap_enabled
from .modes import StepPolicy

__all__ = ["KV_GROUPS_ENV", "REGIONS", "PatchExchange", "kv_groups", "kv_runs", "layout_dtypes"]

REGIONS = ("top", "kv", "gn", "bottom")

# About how many transfers a stale step's deferred K/V are cut into (Note [K/V groups]). Default 1: one
# transfer, awaited whole at the next step's first self-attention, the path the cuda tier passes in full (H100,
# 2026-12-07: 16 passed); 8 groups did not shorten the step where measured (H200, P = 4, 2048 px) and passed 10 of
# the tier's 16 tests (the rest cut by the call's limit, none failed).
KV_GROUPS_ENV = "ASYNCDIFF_RT_PATCH_KV_GROUPS"


def kv_groups() -> int:
    """ASYNCDIFF_RT_PATCH_KV_GROUPS (default 1), a whole number >= 1, or a ConfigError naming the fix."""
    raw = os.environ.get(KV_GROUPS_ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{KV_GROUPS_ENV}={raw!r}: expected a whole number >= 1 (the default is 1); unset it")
    return value


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: torch.Size
    offset: int = 0  # elements into the flat buffer of its dtype (set when the layout is frozen)

    @property
    def numel(self) -> int:
        return self.shape.numel()


def _pieces(region: str, value: torch.Tensor) -> list[torch.Tensor]:
    """A region's value as contiguous tensors to send or receive: K/V (2, batch, tokens, inner) as its 2 x batch
    blocks (a view into a whole buffer is not contiguous, Note [kv slots]), the others whole."""
    if region != "kv":
        return [value]
    return [value[j, b] for j in range(value.shape[0]) for b in range(value.shape[1])]


def kv_runs(sizes: list[int], groups: int) -> list[int]:
    """The transfer group of each K/V point, given each point's bytes in forward order: consecutive points, cut
    where a group would pass 1/`groups` of the total (so about `groups` groups; Note [K/V groups])."""
    target = -(-sum(sizes) // max(1, groups))
    out, group, held = [], 0, 0
    for size in sizes:
        if held and held + size > target:
            group, held = group + 1, 0
        out.append(group)
        held += size
    return out


def layout_dtypes(entries: dict[tuple, dict[str, _Entry]]) -> list[torch.dtype]:
    """The dtypes of the flat buffers in layout order, by name (Note [dtype order])."""
    return sorted({e.dtype for regions in entries.values() for r, e in regions.items() if r != "kv"}, key=str)


class PatchExchange:
    """Exchange points and buffers of rank `rank` of `world` patches over `transport`, for one call signature."""

    def __init__(
        self, rank: int, world: int, transport: Any, device: torch.device, kv_groups: int = 1, kv_puts: bool = False
    ):
        self.rank, self.world, self.transport, self.device = rank, world, transport, device
        self.kv_groups = kv_groups  # about how many transfers the deferred K/V are cut into (Note [K/V groups])
        self.kv_puts = kv_puts  # whether to try the peer windows (Note [K/V puts]); every rank alike
        self.entries: dict[tuple, dict[str, _Entry]] = {}  # point -> region -> entry, in registration order
        self.full_bytes: dict[tuple, int] = {}  # point -> bytes of this patch's whole input (for the report)
        self.frozen = False
        # [slot][point][region] -> own value; [slot][peer][point][region] -> that peer's value
        self.mine: list[dict] = [{}, {}]
        self.theirs: list[dict] = [{q: {} for q in self.peers}, {q: {} for q in self.peers}]
        self._flat_mine: list[dict] = [{}, {}]  # [slot][dtype] -> flat buffer (after freezing)
        self._flat_theirs: list[dict] = [{}, {}]  # [slot][peer][dtype]
        self._spans: dict[torch.dtype, dict[str, tuple[int, int]]] = {}  # dtype -> region -> (start, end)
        self._kv: dict[tuple, torch.Tensor] = {}  # point -> (2, batch, P, tokens, inner), every patch's K/V
        self.policy = StepPolicy("full_sync", 1, 0)
        self.read_slot = 0
        self._calls: dict[str, int] = {}
        self._gather: dict | None = None
        self._kv_group: dict[tuple, int] = {}  # point -> its transfer group (Note [K/V groups])
        self._kv_transfer: DeferredExchange | None = None  # made with the layout (Note [deferred K/V])
        self._kv_awaited = -1  # the last K/V group this step waited for
        self._windows: PeerWindows | None = None  # Note [K/V puts]: made with the layout, None: through the slots
        self._put_pairs: dict[tuple, list] = {}  # point -> (dst in a peer's window, own K/V block) per peer and block
        self._token = torch.zeros(1, dtype=torch.int32, device=device)  # the message behind a group's puts
        self._token_in = {q: torch.zeros_like(self._token) for q in self.peers}

    @property
    def puts(self) -> bool:
        """Whether the stale K/V go as puts into the peers' windows (Note [K/V puts]); known once frozen."""
        return self._windows is not None

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
        self._kv_awaited = -1

    def point(self, name: str) -> tuple:
        """The exchange point of this call of module `name` (a module called twice per forward has two)."""
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        return (name, index)

    def kv_buffer(self, key: tuple) -> torch.Tensor | None:
        """Every patch's K/V at point `key`, (2, batch, P, tokens, inner): the layer writes its own part
        [:, :, rank] in place and reads the whole (Note [kv slots]); None before the layout exists. A stale step's
        first access to a point of each transfer group waits for that group, still in flight, before its own part is
        overwritten (Note [deferred K/V], Note [K/V groups])."""
        if not self.frozen or key not in self._kv:
            return None
        group = self._kv_group[key]
        if not self.policy.exact and group > self._kv_awaited:
            self.await_deferred(group)
            self._kv_awaited = group
        return self._kv[key]

    def await_deferred(self, group: int = -1) -> None:
        """The current stream waits for transfer group `group` of the last deferred K/V exchange (default: the last
        group, so all of it; Note [deferred K/V]): at a stale step's first access to each group, and before a
        forward with exchanges at its points."""
        if self._kv_transfer is not None:
            self._kv_transfer.await_received(group)

    def retire(self) -> None:
        """Before this exchange's buffers go (a new call signature, `remove`): the current stream waits for the K/V
        still in flight into or out of them; with peer windows the host waits too, so that no put is still queued
        when the mappings close (Note [K/V puts])."""
        self.await_deferred()
        if self._windows is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._windows, self._put_pairs = None, {}

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
                if value.data_ptr() != dst.data_ptr():  # not made in place (`kv_buffer`)
                    dst.copy_(value)
        if fresh:
            if self.world > 1 and self.puts and set(own) == {"kv"}:  # Note [K/V puts], at the point
                put(self._put_pairs[key])
                self.transport.exchange(
                    self.policy.step,
                    {q: [self._token] for q in self.peers},
                    {q: [self._token_in[q]] for q in self.peers},
                )
            elif self.world > 1:
                mine, theirs = self.mine[slot][key], self.theirs[slot]
                sends = {q: [t for r in own if r in self.wanted_from_me(q) for t in _pieces(r, mine[r])]
                         for q in self.peers}  # fmt: skip
                recvs = {q: [t for r in own if r in self.wanted_of(q) for t in _pieces(r, theirs[q][key][r])]
                         for q in self.peers}  # fmt: skip
                self.transport.exchange(self.policy.step, sends, recvs)
            read = slot
        else:
            read = self.read_slot  # stale K/V: `kv_buffer` waited for them (Note [deferred K/V])
        others = {r: {q: self.theirs[read][q][key][r] for q in self.peers if r in self.wanted_of(q)} for r in own}
        return {r: self.mine[read][key][r] for r in own}, others

    def end_step(self, rows: torch.Tensor) -> torch.Tensor:
        """After the forward: every patch's output `rows` on every rank, in row order (axis -2), and the packed
        exchange of this step's stale values (Note [slots]): halos and moments with the rows, synchronously; K/V
        behind them, waited for where step k+1 first reads them (Note [deferred K/V]). The first step of a
        signature freezes the layout."""
        slot = self.policy.step % 2
        if not self.frozen:
            self._freeze()
        if self.world > 1:
            rows = rows.contiguous()
            if self._gather is None or self._gather[self.peers[0]].shape != rows.shape:
                self._gather = {q: torch.empty_like(rows) for q in self.peers}
            regions = self.policy.packed_regions
            sends, recvs, kv_groups = self._closing(slot, regions, rows)
            self.transport.exchange(self.policy.step, sends, recvs)
            if kv_groups:
                self._kv_transfer.exchange(self.policy.step, kv_groups)
            rows = torch.cat([rows if q == self.rank else self._gather[q] for q in range(self.world)], dim=-2)
        if self.policy.writes_own:
            self.read_slot = slot
        return rows

    def prepare_transport(self, regions: tuple[str, ...]) -> None:
        """Size the transport for the closing exchanges of `regions` before a CUDA graph bakes its channels in:
        shm replaces a channel that a message outgrows, and a captured op would keep writing the old one."""
        if not self.frozen or self.world == 1 or not regions or self._gather is None:
            return
        sends, recvs, kv_groups = self._closing(0, regions, self._gather[self.peers[0]])
        for s, r, *_ in [(sends, recvs), *kv_groups]:
            self.transport.prepare({q: v for q, v in s.items() if v}, {q: v for q, v in r.items() if v})

    def _closing(self, slot: int, regions: tuple[str, ...], rows: torch.Tensor) -> tuple:
        """A step's closing exchanges: (sends, receives) per peer of the rows, then the flat spans of `regions`
        (into `slot`); and per K/V group (Note [K/V groups]) the (sends, receives, puts) of its points' K/V parts in
        registration order (Note [kv slots]): puts and one message per peer (Note [K/V puts]) or the parts as
        messages; no group unless "kv" is in `regions`."""
        sends, recvs = {}, {}
        for q in self.peers:
            sends[q] = [rows] + self._spans_of(self._flat_mine[slot], self.wanted_from_me(q), regions)
            recvs[q] = [self._gather[q]] + self._spans_of(self._flat_theirs[slot][q], self.wanted_of(q), regions)
        kv_groups: list[tuple[dict, dict]] = []
        for key, whole in self._kv.items() if "kv" in regions else ():
            if self._kv_group[key] == len(kv_groups):
                tokens = self._windows is not None  # the message behind a group's puts
                kv_groups.append(({q: [self._token] * tokens for q in self.peers},
                                  {q: [self._token_in[q]] * tokens for q in self.peers}, []))  # fmt: skip
            group_sends, group_recvs, puts = kv_groups[-1]
            if self._windows is not None:
                puts += self._put_pairs[key]
                continue
            own = _pieces("kv", whole[:, :, self.rank])
            for q in self.peers:
                group_sends[q] += own  # every peer gets the same own K/V
                group_recvs[q] += _pieces("kv", whole[:, :, q])
        return sends, recvs, kv_groups

    # ---- layout -----------------------------------------------------------------------------------------------------
    def _register(self, key: tuple, own: dict[str, torch.Tensor], full_bytes: int) -> None:
        if key in self.entries:
            raise RuntimeError(f"PatchParallel: exchange point {key} registered twice in one step")
        self.entries[key] = {r: _Entry(v.dtype, v.shape) for r, v in own.items()}
        self.full_bytes[key] = full_bytes
        # standalone until the layout is frozen, then views into the flat buffers; zeros, not empty: the regions a
        # peer never sends (the far halo) are copied into the flat buffers too, and should not hold garbage there
        # K/V once for both slots (Note [kv slots]): the registering step's copies are the memory peak otherwise
        for values in [self.mine] + [[self.theirs[s][q] for s in (0, 1)] for q in self.peers]:
            kv = {r: torch.zeros_like(v) for r, v in own.items() if r == "kv"}
            for slot in (0, 1):
                values[slot][key] = {r: kv[r] if r == "kv" else torch.zeros_like(v) for r, v in own.items()}

    def _freeze(self) -> None:
        """Lay every point's values out flat, region-major per dtype, K/V apart (Note [kv slots]), and move the
        first step's values there."""
        sizes: dict[torch.dtype, int] = {}
        for dtype in layout_dtypes(self.entries):
            start, spans = 0, {}
            for region in REGIONS:
                begin = start
                for entries in self.entries.values():
                    entry = entries.get(region)
                    if region != "kv" and entry is not None and entry.dtype == dtype:
                        entry.offset, start = start, start + entry.numel
                spans[region] = (begin, start)
            self._spans[dtype], sizes[dtype] = spans, start
        for slot in (0, 1):
            self._flat_mine[slot] = self._flatten(self.mine[slot], sizes)
            self._flat_theirs[slot] = {q: self._flatten(self.theirs[slot][q], sizes) for q in self.peers}
        kv_keys = [key for key, entries in self.entries.items() if "kv" in entries]
        windows = self._kv_windows([self.entries[key]["kv"] for key in kv_keys])
        for i, key in enumerate(kv_keys):
            self._kv[key] = self._whole_kv(key, self.entries[key]["kv"], windows.local[i] if windows else None)
        for i, key in enumerate(kv_keys if windows is not None else ()):  # made once: the buffers never move
            own = _pieces("kv", self._kv[key][:, :, self.rank])
            theirs = [_pieces("kv", windows.remote[q][i][:, :, self.rank]) for q in self.peers]
            self._put_pairs[key] = [pair for blocks in theirs for pair in zip(blocks, own)]
        groups = kv_runs([entries["kv"].numel for entries in self.entries.values() if "kv" in entries], self.kv_groups)
        self._kv_group = dict(zip(self._kv, groups))
        self._kv_transfer = DeferredExchange(self.transport, self.device, overlap_enabled(), max(groups, default=0) + 1)
        self.frozen = True

    def _kv_windows(self, kv: list[_Entry]) -> PeerWindows | None:
        """With puts (Note [K/V puts]): every K/V point's whole buffer in one window of this rank that its peers
        map, in registration order; None (a buffer per point) otherwise. Collective."""
        if not (self.kv_puts and kv and len({e.dtype for e in kv}) == 1):
            return None
        if StepPolicy(self.policy.sync_mode, self.policy.warm_up, self.policy.step + 1).exact:
            # the next step writes every part before reading it: the registering step's K/V go first, so that the
            # window is not allocated beside them (it was the set-up's memory peak)
            for held in [*self.mine, *(self.theirs[s][q] for s in (0, 1) for q in self.peers)]:
                for regions in held.values():
                    regions.pop("kv", None)
        shapes = [(e.shape[0], e.shape[1], self.world, *e.shape[2:]) for e in kv]
        self._windows = PeerWindows.create(self.transport, shapes, kv[0].dtype, self.device)
        return self._windows

    def _whole_kv(self, key: tuple, entry: _Entry, window: torch.Tensor | None) -> torch.Tensor:
        """The one K/V buffer of point `key` (`window` if given, zero-filled), holding the registering step's values
        unless `_kv_windows` dropped them; both slots' K/V become views of it (Note [kv slots])."""
        kv, batch, *rest = entry.shape  # the own part's (2, batch, tokens, inner)
        shape = (kv, batch, self.world, *rest)
        whole = window if window is not None else torch.zeros(shape, dtype=entry.dtype, device=self.device)
        for q in range(self.world):
            both = [self.mine[s][key] if q == self.rank else self.theirs[s][q][key] for s in (0, 1)]
            if "kv" in both[0]:  # one tensor for both slots since `_register`
                whole[:, :, q].copy_(both[0]["kv"])
            for values in both:
                values["kv"] = whole[:, :, q]
        return whole

    def _flatten(self, values: dict, sizes: dict) -> dict:
        flat = {dtype: torch.zeros(n, dtype=dtype, device=self.device) for dtype, n in sizes.items()}
        for key, regions in values.items():
            for region, old in regions.items():
                if region == "kv":  # one buffer of every patch's per point (Note [kv slots])
                    continue
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
