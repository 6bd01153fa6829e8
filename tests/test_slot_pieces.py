"""Messages larger than the transports' slot cap travel in pieces (transport/pieces.py, transport/shm.py Note
[slot cap]): the cut itself, and an all-to-all over `shm` on 3 processes whose channels stay within the cap."""

from __future__ import annotations

import pytest
from pieces_cases import run_all_to_all

from asyncdiff_rt import native
from asyncdiff_rt.tools.launch import spawn
from asyncdiff_rt.transport.pieces import ALIGNMENT, SLOT_ENV, default_slot_bytes, split

KIB = 1024


def _covered(pieces):
    """The byte ranges the pieces copy, merged where one continues the other."""
    out = []
    for ptr, n in (part for piece in pieces for part in piece):
        if out and out[-1][1] == ptr and n:
            out[-1][1] += n
        else:
            out.append([ptr, ptr + n])
    return out


def test_the_cut_aligns_as_the_native_channel_packs():
    assert ALIGNMENT == native.load().ShmChannel.PART_ALIGNMENT


def test_parts_that_fit_stay_one_piece_unchanged():
    parts = [(4096, 100), (8192, 3000), (1 << 20, 0)]
    assert split(parts, 64 * KIB) == [parts]
    assert split([], 64 * KIB) == [[]]


@pytest.mark.parametrize("cap", [64 * KIB, 128 * KIB])
def test_a_message_is_cut_into_aligned_pieces_that_fit_and_cover_it(cap):
    packed_size = native.load().ShmChannel.packed_size
    parts = [(1 << 30, 300 * KIB + 7), (2 << 30, 5), (3 << 30, 64 * KIB), (4 << 30, 1 * KIB)]
    pieces = split(parts, cap)
    assert len(pieces) > 1 and all(piece for piece in pieces)
    assert all(packed_size(piece) <= cap for piece in pieces)
    assert _covered(pieces) == [[p, p + n] for p, n in parts]  # every byte once, in order
    assert all(ptr % 256 == 0 for piece in pieces for ptr, _ in piece)  # the parts start aligned: so do the cuts


def test_the_slot_cap_setting(monkeypatch):
    monkeypatch.delenv(SLOT_ENV, raising=False)
    assert default_slot_bytes() == 128 * KIB * KIB
    monkeypatch.setenv(SLOT_ENV, "0.1")
    assert default_slot_bytes() == 128 * KIB  # rounded up to the 64 KiB granule
    for bad in ("0", "-3", "lots"):
        monkeypatch.setenv(SLOT_ENV, bad)
        with pytest.raises(ValueError, match=SLOT_ENV):
            default_slot_bytes()


def test_all_to_all_in_pieces_on_three_processes_uses_rank_0s_cap():
    per_rank = spawn(run_all_to_all, 3, ["0.0625", "1", "4"], timeout_s=300)
    for rank, got in enumerate(per_rank):
        assert got["wrong"] == [] and got["broadcast_ok"], (rank, got["wrong"])
        assert got["slot_bytes"] == 64 * KIB, rank
        assert got["capacities"] and max(got["capacities"]) <= 64 * KIB, (rank, got["capacities"])
