"""Who sends which block outputs to whom in a compute round, as printable data (docs/strategies.md).

Rank r < n owns segment S_r; with stride 2, rank n owns S_{n-1} as well, computes it with the other timestep
and sends nothing. Without a trace every rank reads every block it does not own; with one, only the outputs its
own blocks (or, for the rank owning the output, the denoiser's output) read through the glue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...compiler.plan import Plan
from .schedule import roles

__all__ = ["View", "make_views"]


@dataclass
class View:
    """One rank's view of a compute round: the blocks it computes and what it sends and receives."""

    rank: int
    segment: int
    owned: set[str]
    send_to: dict[int, list[str]] = field(default_factory=dict)
    recv_from: dict[int, list[str]] = field(default_factory=dict)
    needs: set[str] = field(default_factory=set)  # non-owned blocks whose outputs this rank reads
    sends: set[str] = field(default_factory=set)  # owned blocks whose outputs some other rank reads

    def __str__(self) -> str:
        out = ", ".join(f"->r{p}: {len(b)}" for p, b in sorted(self.send_to.items())) or "nothing"
        into = ", ".join(f"<-r{p}: {len(b)}" for p, b in sorted(self.recv_from.items())) or "nothing"
        return f"rank {self.rank} S{self.segment} ({len(self.owned)} blocks) sends {out}; receives {into}"


def make_views(plan: Plan, stride: int, ranks: list[int], trace: Any = None) -> list[View]:
    n = plan.model_n
    segments = roles(n, stride)
    owner = plan.owner()

    def needs(r: int) -> set[str]:
        s = segments[r]
        owned = set(plan.segments[s].blocks)
        if trace is None:
            return set(plan.blocks) - owned
        return trace.needed_by(owned, owns_output=s == n - 1)

    views = []
    for rank in ranks:
        seg = segments[rank]
        view = View(rank, seg, set(plan.segments[seg].blocks))
        mine = needs(rank)
        for peer, peer_seg in enumerate(segments):
            if peer == rank or peer_seg == seg:
                continue
            if rank < n:  # ranks 0..n-1 send; rank n (stride 2) serves ε only
                theirs = needs(peer)
                view.send_to[peer] = [b for b in plan.blocks if owner[b] == seg and b in theirs]
            if peer < n:
                view.recv_from[peer] = [b for b in plan.blocks if owner[b] == peer_seg and b in mine]
        view.send_to = {p: bs for p, bs in view.send_to.items() if bs}
        view.recv_from = {p: bs for p, bs in view.recv_from.items() if bs}
        view.needs = mine
        view.sends = {b for bs in view.send_to.values() for b in bs}
        views.append(view)
    return views
