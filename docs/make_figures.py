"""Draw the figures of docs/strategies.md: who computes what at step k (run: python docs/make_figures.py).

One panel per stride, model_n = 3: a row per rank, a column per segment of the denoiser. A coloured cell is a
segment the rank computes at step k, with its timestep; a grey cell is a segment the rank does not compute: its
blocks' outputs are replayed from their owner's previous round (the stale rule). The last column says where ε
comes from.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

HERE = os.path.dirname(os.path.abspath(__file__))
FRESH, FRESH_LO, STALE = "#4477aa", "#66ccee", "#dddddd"


def _panel(ax, title: str, rows: list[tuple[str, list[str | None], str]], stale: str, eps_only: int = -1) -> None:
    """rows: (rank label, per segment the timestep it computes with or None, what its output serves); `stale`
    names where replayed outputs come from; row `eps_only` computes for ε alone (stride 2's extra rank)."""
    n = len(rows[0][1])
    for y, (label, cells, serves) in enumerate(rows):
        for x, t in enumerate(cells):
            color = STALE if t is None else (FRESH_LO if y == eps_only else FRESH)
            ax.add_patch(plt.Rectangle((x, -y - 1), 0.95, 0.9, color=color))
            text = f"S{x}\n{t}" if t else f"S{x}\nreplayed:\n{stale}"
            ax.text(x + 0.475, -y - 0.55, text, ha="center", va="center", fontsize=8, color="black")
        ax.text(-0.1, -y - 0.55, label, ha="right", va="center", fontsize=9)
        ax.text(n + 0.1, -y - 0.55, serves, ha="left", va="center", fontsize=8)
    ax.set_xlim(-1.2, n + 2.6)
    ax.set_ylim(-len(rows) - 0.2, 0.4)
    ax.set_title(title, fontsize=10, loc="left")
    ax.axis("off")


def main() -> None:
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.4))
    _panel(
        a1,
        "stride 1, model_n = 3 (3 ranks), step k >= warm_up",
        [
            ("rank 0", ["τ[k]", None, None], "S0's block outputs -> ranks 1, 2 (used at k+1)"),
            ("rank 1", [None, "τ[k]", None], "S1's block outputs -> ranks 0, 2 (used at k+1)"),
            ("rank 2", [None, None, "τ[k]"], "ε_k -> every rank (scheduler step)"),
        ],
        "step k-1 outputs",
    )
    _panel(
        a2,
        "stride 2, model_n = 3 (4 ranks), one round covers steps k and k+1",
        [
            ("rank 0", ["τ[k+1]", None, None], "S0's outputs -> the next round"),
            ("rank 1", [None, "τ[k+1]", None], "S1's outputs -> the next round"),
            ("rank 2", [None, None, "τ[k+1]"], "S2's outputs -> the next round"),
            ("rank 3", [None, None, "τ[k]"], "ε_k -> every rank; ε_(k+1) = ε_k"),
        ],
        "previous round",
        eps_only=3,
    )
    fig.text(
        0.01,
        0.01,
        "coloured: computed at this step with the timestep shown (light: computed for ε only); grey: that segment's\n"
        "block outputs replayed from the previous round, as its owner computed them. Replicated code (embeddings,\n"
        "glue between blocks) runs fresh on every rank.",
        fontsize=7.5,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = os.path.join(HERE, "who_computes_what.png")
    fig.savefig(path, dpi=110)
    print(path)


if __name__ == "__main__":
    main()
