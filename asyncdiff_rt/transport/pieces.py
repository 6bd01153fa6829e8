"""A message larger than a channel's slot cap, cut into pieces that each fit one slot (the `shm` and `ipc`
transports, shm.py Note [slot cap]).

A message is a list of parts (pointer, bytes) packed into one slot, each part at a 256-byte aligned offset
(csrc/shm_channel.h). `split` keeps the parts in order and cuts a part where the slot is full, at a multiple of 256
bytes, so the next piece starts aligned. Both sides of a channel pass the same sizes, so they cut alike.
"""

from __future__ import annotations

import os

__all__ = ["ALIGNMENT", "SLOT_ENV", "aligned", "default_slot_bytes", "split"]

ALIGNMENT = 256  # csrc/shm_channel.h: ShmChannel::kPartAlignment (tests/test_slot_pieces.py checks they agree)
GRANULE = 64 * 1024  # the channels' capacity granule (shm.py): a slot cap is a multiple of it
SLOT_ENV = "ASYNCDIFF_RT_SLOT_MB"  # the slot cap in MiB (default 128)
_DEFAULT_MB = 128


def default_slot_bytes() -> int:
    """The slot cap from ASYNCDIFF_RT_SLOT_MB (MiB, may be fractional; default 128), rounded up to 64 KiB."""
    raw = os.environ.get(SLOT_ENV, "").strip()
    try:
        mb = float(raw) if raw else _DEFAULT_MB
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise ValueError(f"{SLOT_ENV}={raw!r}: give the slot cap in MiB as a positive number (default {_DEFAULT_MB})")
    return max(GRANULE, -(-int(mb * 1024 * 1024) // GRANULE) * GRANULE)


def aligned(offset: int) -> int:
    """`offset` (bytes) rounded up to the next 256-byte boundary, where a part or a buffer starts."""
    return -(-offset // ALIGNMENT) * ALIGNMENT


def split(parts: list[tuple[int, int]], cap: int) -> list[list[tuple[int, int]]]:
    """`parts` as pieces whose packed size is at most `cap` (a multiple of 256): one piece, the parts unchanged,
    when they fit; never an empty piece (an empty message is one empty piece)."""
    if cap % ALIGNMENT or cap <= 0:
        raise ValueError(f"slot cap {cap} is not a positive multiple of {ALIGNMENT}")
    pieces: list[list[tuple[int, int]]] = [[]]
    offset = 0
    for ptr, nbytes in parts:
        while True:
            start = aligned(offset)
            room = cap - start
            if pieces[-1] and (room <= 0 or (room < nbytes and room < GRANULE)):  # no useful room left here
                pieces.append([])
                start, room = 0, cap
            take = nbytes if nbytes <= room else room - room % ALIGNMENT
            pieces[-1].append((ptr, take))
            offset = start + take
            ptr, nbytes = ptr + take, nbytes - take
            if nbytes == 0:
                break
    return pieces
