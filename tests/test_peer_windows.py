"""Peer windows (asyncdiff_rt/transport/windows.py) on the CPU: where puts apply, a peer's view of a local part,
and the set-up's all-or-none rule, with a fake transport whose all-gather returns what a peer would have sent."""

from __future__ import annotations

import glob
import logging
import os

import pytest
import torch

from asyncdiff_rt.transport.base import Transport
from asyncdiff_rt.transport.windows import PeerWindows, put, puts_supported


class _Fake(Transport):
    """Rank 0 of 2; `peer` is what rank 1 answers to each all-gather, in order."""

    def __init__(self, name: str, peer: list):
        self.name, self.rank, self.world_size, self._peer, self.phases = name, 0, 2, list(peer), []

    def exchange(self, step, sends, recvs):
        raise NotImplementedError

    def broadcast(self, tensor, src, step):
        raise NotImplementedError

    def all_gather_object(self, obj, phase=None):
        self.phases.append(phase)
        return [obj, self._peer.pop(0)]


def _own_files() -> set[str]:
    return set(glob.glob(f"/dev/shm/adrt_window_{os.getpid()}_*"))


def test_puts_apply_to_ipc_on_cuda_and_shm_on_the_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert puts_supported(_Fake("shm", []), cpu) and puts_supported(_Fake("ipc", []), cuda)
    assert not puts_supported(_Fake("shm", []), cuda)  # its slots are host memory: no device window
    assert not any(puts_supported(_Fake(n, []), d) for n in ("gloo", "nccl", "local") for d in (cpu, cuda))


def test_a_window_mapped_by_a_peer_sees_the_puts_in_the_same_buffer_at_the_same_offsets():
    other = f"/dev/shm/adrt_window_test_peer_{os.getpid()}"
    peer_flat = torch.from_file(other, shared=True, size=64 + 16, dtype=torch.float32)  # 24 -> 64, 10 -> 16
    try:
        fake = _Fake("shm", [(other, ""), ""])  # rank 1 exported `other`, then mapped ours without a problem
        before = _own_files()
        windows = PeerWindows.create(fake, [(2, 3, 4), (10,)], torch.float32, torch.device("cpu"))
        assert windows is not None and fake.phases == ["the peer windows' set-up (K/V puts)"] * 2
        assert _own_files() == before  # our file is unlinked once the peer mapped it; the mapping stays
        assert [t.shape for t in windows.local] == [t.shape for t in windows.remote[1]] == [(2, 3, 4), (10,)]
        src = torch.arange(1, 9, dtype=torch.float32).view(2, 4)
        put([(windows.remote[1][0][:, 1], src), (windows.remote[1][1], torch.full((10,), 7.0))])
        # where rank 1 reads them: buffer 0 at 0, buffer 1 on the next 256-byte boundary (element 64)
        assert torch.equal(peer_flat[:24].view(2, 3, 4)[:, 1], src)
        assert torch.equal(peer_flat[64:74], torch.full((10,), 7.0))
        assert peer_flat.count_nonzero() == 18  # nothing else written
        assert all(t.count_nonzero() == 0 for t in windows.local)  # a put writes the peer's window, not ours
    finally:
        os.unlink(other)


@pytest.mark.parametrize("failing", ["export", "map"])
def test_a_window_that_cannot_be_shared_makes_every_rank_keep_the_slots(failing, caplog):
    """Rank 1 could not export its window, or this rank cannot map rank 1's (a path that cannot exist): the
    problem reaches every rank through the all-gathers, so all of them return None (the slots) and say why."""
    problem = "rank 1 could not export its window: RuntimeError: no IPC here"
    answers = [(None, problem)] if failing == "export" else [("/dev/shm/adrt_no_such_dir/window", ""), ""]
    before = _own_files()
    with caplog.at_level(logging.WARNING, logger="asyncdiff_rt"):
        windows = PeerWindows.create(_Fake("shm", answers), [(16,)], torch.float32, torch.device("cpu"))
    assert windows is None
    assert "the K/V go through the exchange slots" in caplog.text
    assert (problem if failing == "export" else "rank 0 could not map a peer's window") in caplog.text
    assert _own_files() == before  # nothing left in /dev/shm
