"""The native runtime on one GPU: shm channel (stream memory operations, D2H/H2D through page-locked shared
memory) between 2-3 processes, CUDA graph capture of a send/recv pair, the shm transport, NCCL with a world of
one. Run with `pytest -m cuda tests/cuda` on a GPU machine after scripts/device_build.sh.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
import torch
from channel_cases import SPECS, cuda_native, transport_dies
from channel_cases import capacity as _capacity
from channel_cases import collect as _collect
from channel_cases import parts as _parts
from channel_cases import pattern as _pattern
from channel_cases import spawn as _spawn
from channel_cases import stream as _stream

from asyncdiff_rt import native

pytestmark = pytest.mark.cuda

C = pytest.fixture(cuda_native, scope="module", name="C")


def _name(tag: str) -> str:
    return f"adrt_cuda_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------------------------------------------------
def _gpu_sender(name: str, steps: int, device: int, delays: dict[int, float]):
    C = native.load()
    if device >= 0:
        torch.cuda.set_device(device)
    dev = "cuda" if device >= 0 else "cpu"
    ch = C.ShmChannel(name, capacity=_capacity(C), create=False, device=device, peer=0, timeout_s=60.0)
    keep = []
    for seq in range(1, steps + 1):
        if seq in delays:
            if device >= 0:
                torch.cuda.synchronize()
            time.sleep(delays[seq])
        tensors = [_pattern(seq, k, shape, dtype, dev) for k, (shape, dtype) in enumerate(SPECS)]
        ch.send(seq, _parts(tensors), _stream() if device >= 0 else 0)
        keep.append(tensors)  # alive until the copies ran
        if len(keep) > 4:
            ch.wait(seq - 3, 60.0)
            keep.pop(0)
    ch.wait(steps, 60.0)
    ch.close()
    return "sent"


@pytest.mark.parametrize("sender_device", [0, -1], ids=["gpu_sender", "cpu_sender"])
def test_shm_channel_gpu_two_processes(C, sender_device):
    name = _name("chan")
    steps = 60
    proc, queue = _spawn(_gpu_sender, name, steps, sender_device, {3: 0.3, 30: 0.2})
    ch = C.ShmChannel(name, capacity=_capacity(C), create=True, device=0, peer=1, timeout_s=60.0)
    bufs = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in SPECS]
    for seq in range(1, steps + 1):
        for b in bufs:
            b.fill_(float("nan") if b.is_floating_point() else 77)
        ch.recv(seq, _parts(bufs), _stream())
        if seq == 20:
            time.sleep(0.3)  # a late host: the GPU side must still be correct
        for k, (shape, dtype) in enumerate(SPECS):
            assert torch.equal(bufs[k], _pattern(seq, k, shape, dtype)), (seq, k)
    ch.wait(steps, 30.0)
    assert _collect(proc, queue) == "sent"
    ch.close()


def _open_and_idle(name: str, capacity: int, linger_s: float, die: bool):
    C = native.load()
    ch = C.ShmChannel(name, capacity=capacity, create=False, device=-1, peer=0, timeout_s=30.0)
    time.sleep(linger_s)
    if die:
        os._exit(0)
    del ch
    return "idle"


@pytest.mark.parametrize("die", [True, False], ids=["dead_peer", "silent_peer"])
def test_shm_channel_gpu_timeout_releases_stream(C, die):
    name = _name("stall")
    proc, _ = _spawn(_open_and_idle, name, 4096, 0.5 if die else 20.0, die)
    ch = C.ShmChannel(name, capacity=4096, create=True, device=0, peer=1, timeout_s=60.0)
    while os.path.exists(f"/dev/shm/{name}"):  # until the peer opened
        time.sleep(0.05)
    buf = torch.zeros(16, device="cuda")
    ch.recv(3, _parts([buf]), _stream())  # enqueued: the stream now waits for a message that never comes
    after = buf + 1  # work queued behind the blocked wait
    t0 = time.monotonic()
    pattern = r"peer rank 1.*step 3\b.*exited" if die else r"peer rank 1.*step 3\b.*timed out"
    with pytest.raises(RuntimeError, match=pattern):
        ch.wait(3, 10.0 if die else 1.0)
    assert time.monotonic() - t0 < 9.0
    torch.cuda.synchronize()  # the stream was released: this returns
    # Nothing was ever sent: the released recv copied the fresh (zero-filled) slot, and the work queued behind it
    # ran after that copy.
    assert torch.equal(buf.cpu(), torch.zeros(16)), buf
    assert torch.equal(after.cpu(), torch.ones(16)), after
    assert ch.failed
    with pytest.raises(RuntimeError, match="failed earlier"):
        ch.recv(4, _parts([buf]), _stream())
    ch.close()
    proc.terminate()
    proc.join(timeout=30)


# ---------------------------------------------------------------------------------------------------------------
def test_graph_capture_send_recv_pair_in_one_process(C):
    name = _name("graph1")
    cap = 1 << 20
    a = C.ShmChannel(name, cap, True, 0, 1, 30.0)
    b = C.ShmChannel(name, cap, False, 0, 0, 30.0)
    src = torch.randn(1000, 100, device="cuda")
    dst = torch.zeros_like(src)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        a.send(1, _parts([src]), s.cuda_stream)  # eager warm-up
        b.recv(1, _parts([dst]), s.cuda_stream)
    s.synchronize()
    assert torch.equal(dst, src)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        st = torch.cuda.current_stream().cuda_stream
        a.send(2, _parts([src]), st)
        b.recv(2, _parts([dst]), st)
    for i in range(5):
        src.copy_(torch.full_like(src, float(i)) + torch.arange(100, device="cuda"))
        dst.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(dst, src), i
    a.close()
    b.close()


def _graph_side(name: str, create: bool, replays: int):
    C = native.load()
    torch.cuda.set_device(0)
    cap = 1 << 20
    ch = C.ShmChannel(name, cap, create, 0, 1 if create else 0, 60.0)
    buf = torch.zeros(512, 256, device="cuda")
    g = torch.cuda.CUDAGraph()
    if create:  # sender: eager message 1, then a captured send replayed
        buf.fill_(-1.0)
        ch.send(1, _parts([buf]), _stream())
        with torch.cuda.graph(g):
            ch.send(2, _parts([buf]), torch.cuda.current_stream().cuda_stream)
        for i in range(replays):
            buf.fill_(float(i))  # same stream as the replay: ordered before the captured copy
            g.replay()
        torch.cuda.synchronize()
        return "sent"
    got = []
    ch.recv(1, _parts([buf]), _stream())
    got.append(float(buf.mean()))
    with torch.cuda.graph(g):
        ch.recv(2, _parts([buf]), torch.cuda.current_stream().cuda_stream)
    for _ in range(replays):
        g.replay()
        got.append(float(buf.min()) if float(buf.min()) == float(buf.max()) else float("nan"))
    return got


def test_graph_capture_replayed_across_processes(C):
    name = _name("graph2")
    replays = 8
    sender = _spawn(_graph_side, name, True, replays)
    receiver = _spawn(_graph_side, name, False, replays)
    assert _collect(*receiver) == [-1.0] + [float(i) for i in range(replays)]
    assert _collect(*sender) == "sent"


# ---------------------------------------------------------------------------------------------------------------
def _transport_rank(rank: int, world: int, store_path: str, steps: int):
    import torch.distributed as dist

    from asyncdiff_rt.transport.shm import ShmTransport

    torch.cuda.set_device(0)
    store = dist.FileStore(store_path, world)
    tr = ShmTransport(rank, world, store, device="cuda:0", timeout_s=60.0)
    peers = [p for p in range(world) if p != rank]

    def payload(step, src, dst):
        return [
            torch.full((64, 33), float(step * 100 + src * 10 + dst), device="cuda"),
            torch.arange(5 + src + dst, dtype=torch.int64, device="cuda") * (step + 1),
        ]

    tr.prepare({p: payload(0, rank, p) for p in peers}, {p: payload(0, p, rank) for p in peers})
    errors = []
    for step in range(steps):
        sends = {p: payload(step, rank, p) for p in peers}
        recvs = {p: [torch.full_like(t, -1) for t in payload(step, p, rank)] for p in peers}
        tr.exchange(step, sends, recvs)
        for p, ts in recvs.items():
            for got, want in zip(ts, payload(step, p, rank)):
                if not torch.equal(got, want):
                    errors.append(f"exchange step {step} from {p}")
        src = step % world
        x = torch.full((2, 999), float(step), device="cuda") if rank == src else torch.zeros(2, 999, device="cuda")
        tr.broadcast(x, src=src, step=step)
        if not torch.equal(x, torch.full((2, 999), float(step), device="cuda")):
            errors.append(f"broadcast step {step} from {src}")
    tr.synchronize()
    tr.close()
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_shm_transport_cuda(C, tmp_path, world):
    store_path = str(tmp_path / "store")
    procs = [_spawn(_transport_rank, r, world, store_path, 20) for r in range(world)]
    assert [_collect(p, q) for p, q in procs] == [[]] * world


@pytest.mark.parametrize("host_sync_first", [False, True], ids=["transport_sync", "host_sync"])
def test_shm_transport_cuda_dead_peer(C, tmp_path, host_sync_first):
    store_path = str(tmp_path / "store")
    t0 = time.monotonic()
    p0, p1 = (_spawn(transport_dies, r, store_path, host_sync_first, "shm") for r in range(2))
    message, waited, healthy, problem = _collect(*p0)
    p1[0].join(timeout=30)
    # rank 1 exits after step 0: the first exchange rank 0 waits for (step 1) names it, through its pid
    assert re.search(r"peer rank 1\b", message) and re.search(r"\bstep 1\b", message), message
    assert "exited" in message, message
    assert waited < 5.0 + 3, waited  # the transport's timeout is 5 s; the dead pid is noticed before it
    assert time.monotonic() - t0 < 5.0 + 45  # process starts (CUDA contexts) included
    assert healthy, f"CUDA unusable after the dead peer was released: {problem}"


# ---------------------------------------------------------------------------------------------------------------
def test_nccl_world_of_one(C, tmp_path):
    torch.cuda.set_device(0)
    uid = C.nccl_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    comm = C.NcclComm(uid, 1, 0, 0, 60.0)
    s = torch.cuda.Stream()
    x = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    s.wait_stream(torch.cuda.current_stream())
    comm.sendrecv([(0, x.data_ptr(), x.nbytes)], [(0, y.data_ptr(), y.nbytes)], s.cuda_stream)
    comm.broadcast(x.data_ptr(), x.nbytes, 0, s.cuda_stream)
    comm.wait(s.cuda_stream, 30.0, 0)
    assert torch.equal(x, y)
    comm.destroy()
    assert not comm.valid
    with pytest.raises(RuntimeError, match="destroyed"):
        comm.sendrecv([], [], s.cuda_stream)

    import torch.distributed as dist

    from asyncdiff_rt.transport.nccl import NcclTransport

    tr = NcclTransport(0, 1, dist.FileStore(str(tmp_path / "store"), 1), device="cuda:0", timeout_s=60.0)
    a = torch.randn(100, 7, device="cuda")
    b = torch.zeros(7, 100, device="cuda").t()  # non-contiguous receive
    for step in range(4):
        tr.exchange(step, {0: [a * step]}, {0: [b]})
        assert torch.equal(b, a * step)
    a0 = a.clone()
    tr.broadcast(a, src=0, step=4)  # a world of one: the source keeps its data
    assert torch.equal(a, a0)
    b.fill_(-1)
    tr.exchange(5, {0: [a]}, {0: [b]})  # the transport still works after the broadcast
    tr.synchronize()
    assert torch.equal(b, a)
    assert tr.all_gather_object({"r": 0}) == [{"r": 0}]
    tr.synchronize()
    tr.close()
    tr.close()


def test_nccl_watchdog_aborts_stalled_exchange(C, tmp_path):
    import torch.distributed as dist

    from asyncdiff_rt.transport import TransportError
    from asyncdiff_rt.transport.nccl import NcclTransport

    torch.cuda.set_device(0)
    tr = NcclTransport(0, 1, dist.FileStore(str(tmp_path / "store"), 1), device="cuda:0", timeout_s=1.0)
    a = torch.randn(1000, device="cuda")
    b = torch.zeros_like(a)
    tr.exchange(0, {0: [a]}, {0: [b]})
    tr.synchronize()
    assert torch.equal(a, b)
    # A GPU stall longer than the timeout ahead of the exchange: the watchdog aborts the communicator, a host
    # sync outside the transport returns, and the next transport call raises naming the step.
    torch.cuda._sleep(int(4e9))
    tr.exchange(1, {0: [a]}, {0: [b]})
    t0 = time.monotonic()
    torch.cuda.synchronize()
    with pytest.raises(TransportError, match=r"step 1\b.*no progress"):
        tr.exchange(2, {0: [a]}, {0: [b]})
    assert time.monotonic() - t0 < 30
    tr.close()
