"""What one PatchParallel rank sends per step (the bench's bytes columns, DESIGN §10): by region, against
all-gathering every exchanged layer's whole input, and against DistriFusion's all-gather."""

from __future__ import annotations

from .exchange import REGIONS, PatchExchange

__all__ = ["bytes_per_step", "distrifusion_bytes"]


def bytes_per_step(ex: PatchExchange, regions: tuple[str, ...] = REGIONS) -> dict[str, int]:
    """Bytes rank `ex.rank` sends per step in `regions` (halos, K/V, moments), what all-gathering every exchanged
    layer's whole input to every peer would send instead ("all_gather"), and what DistriFusion's all-gather sends
    ("distrifusion", `distrifusion_bytes`)."""
    out = {"halo": 0, "kv": 0, "gn": 0}
    for entries in ex.entries.values():
        for region, entry in entries.items():
            if region not in regions:
                continue
            receivers = sum(region in ex.wanted_from_me(q) for q in ex.peers)
            out["halo" if region in ("top", "bottom") else region] += entry.numel * entry.dtype.itemsize * receivers
    out["all_gather"] = sum(ex.full_bytes.values()) * len(ex.peers)
    out["distrifusion"] = distrifusion_bytes(ex)
    return out


def distrifusion_bytes(ex: PatchExchange) -> int:
    """What rank `ex.rank` sends per async step in distrifuser's one all-gather (mit-han-lab/distrifuser,
    modules/pp): every other rank gets, per 3x3 convolution, both boundaries of `padding` rows (ours: only the rows
    a neighbour reads, to that neighbour), per self-attention the patch's whole K and V, per GroupNorm the moments
    (as ours: 2 x batch x groups, in our moment dtype). Our `bottom` region is exactly `padding` rows."""
    total = 0
    for entries in ex.entries.values():
        for region, entry in entries.items():
            size = entry.numel * entry.dtype.itemsize
            if region == "bottom":
                total += 2 * size  # the top boundary has as many rows as the bottom one
            elif region in ("kv", "gn"):
                total += size
    return total * len(ex.peers)
