"""The flat layout of PatchParallel's exchange buffers is the same on every rank (Note [dtype order] in
strategies/patches/exchange.py): the packed exchange sends each dtype's spans in layout order, and a receiver that
laid its dtypes out in another order reads halos as GroupNorm moments (half precision: float16 halos, float32
moments; the non-finite 2048 px runs of 2026-12-03)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from asyncdiff_rt.strategies.patches.exchange import PatchExchange, layout_dtypes

# A fresh process lays out a half-precision point (float16 halos, float32 moments) and prints the dtype order of
# its flat buffers. Each process hashes dtypes differently (by address), so a set's order differs among them.
_LAYOUT = """
import json, torch
from asyncdiff_rt.strategies.patches.exchange import PatchExchange
ex = PatchExchange(0, 2, None, torch.device("cpu"))
half, moments = torch.zeros(1, 4, 2, 8, dtype=torch.float16), torch.zeros(2, 1, 2, dtype=torch.float32)
ex._register(("conv", 0), {"top": half, "bottom": half}, 0)
ex._register(("norm", 0), {"gn": moments}, 0)
ex._freeze()
print(json.dumps([str(d) for d in ex._spans]))
"""


def _entries(*dtypes: torch.dtype) -> dict:
    ex = PatchExchange(0, 2, None, torch.device("cpu"))
    for i, dtype in enumerate(dtypes):
        ex._register(("layer", i), {"gn": torch.zeros(2, 1, 2, dtype=dtype)}, 0)
    return ex.entries


def test_layout_dtypes_are_ordered_by_name_whatever_the_registration_order():
    expected = [torch.bfloat16, torch.float16, torch.float32]
    assert layout_dtypes(_entries(torch.float32, torch.float16, torch.bfloat16)) == expected
    assert layout_dtypes(_entries(torch.float16, torch.bfloat16, torch.float32, torch.float16)) == expected


def test_every_process_lays_the_dtypes_out_alike():
    # four processes at once: with a set's order each would pick either order, all four alike in 1 of 8 launches
    procs = [subprocess.Popen([sys.executable, "-c", _LAYOUT], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    orders = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert orders == [["torch.float16", "torch.float32"]] * 4, orders


def test_k_v_are_held_once_for_both_slots_from_registration_on():
    """Every patch's K/V are the largest buffers (SDXL at 2048 px: 3.4 GB per rank), so both slots share one copy
    (Note [kv slots] in exchange.py), already while the first step registers them (its memory peak)."""
    ex = PatchExchange(0, 3, None, torch.device("cpu"))
    ex._register(("attn", 0), {"kv": torch.ones(2, 1, 4, 8)}, 0)
    ex._register(("conv", 0), {"top": torch.ones(1, 4, 2, 8), "bottom": torch.ones(1, 4, 2, 8)}, 0)
    for values in [ex.mine, *([ex.theirs[s][q] for s in (0, 1)] for q in ex.peers)]:
        assert values[0][("attn", 0)]["kv"] is values[1][("attn", 0)]["kv"]
        assert values[0][("conv", 0)]["top"] is not values[1][("conv", 0)]["top"]  # halos stay double buffered
    ex._freeze()
    (whole,) = ex._kv.values()
    assert whole.shape == (2, 1, 3, 4, 8)
    for s in (0, 1):
        assert ex.mine[s][("attn", 0)]["kv"].data_ptr() == whole[:, :, 0].data_ptr()
        assert [ex.theirs[s][q][("attn", 0)]["kv"].data_ptr() for q in (1, 2)] == [
            whole[:, :, q].data_ptr() for q in (1, 2)
        ]


def test_k_v_points_are_cut_into_consecutive_groups_of_about_equal_bytes():
    """Note [K/V groups] in exchange.py: consecutive points, a new group where one would pass 1/groups of the
    total; one group keeps today's single transfer; a point larger than the share is a group of its own."""
    from asyncdiff_rt.strategies.patches.exchange import kv_runs

    sdxl_2048_p4 = [21] * 4 + [10.5] * 20 + [10.5] * 10 + [10.5] * 30 + [21] * 6  # MB per point, forward order
    runs = kv_runs([int(2 * mb) for mb in sdxl_2048_p4], 8)
    assert runs == sorted(runs) and runs[0] == 0 and max(runs) + 1 in (8, 9), runs
    assert kv_runs([5, 5, 5, 5], 1) == [0, 0, 0, 0]
    assert kv_runs([5, 5, 5, 5], 2) == [0, 0, 1, 1]
    assert kv_runs([1, 30, 1, 1], 4) == [0, 1, 2, 2]
    assert kv_runs([], 8) == []


@pytest.mark.parametrize("raw", ["0", "-2", "eight", "1.5"])
def test_a_bad_k_v_group_count_is_refused_naming_the_variable(monkeypatch, raw):
    from asyncdiff_rt.errors import ConfigError
    from asyncdiff_rt.strategies.patches.exchange import KV_GROUPS_ENV, kv_groups

    monkeypatch.setenv(KV_GROUPS_ENV, raw)
    with pytest.raises(ConfigError, match=KV_GROUPS_ENV):
        kv_groups()
    monkeypatch.setenv(KV_GROUPS_ENV, "3")
    assert kv_groups() == 3
