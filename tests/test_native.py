"""The native runtime on CPU (CI): build info, the shm channel between processes, the shm transport.

GPU variants live in tests/cuda/test_shm_cuda.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import uuid

import pytest
import torch

from asyncdiff_rt import native

pytestmark = pytest.mark.skipif(not native.available(), reason="asyncdiff_rt._C not built (pip install -e .)")

# Several dtypes and sizes per message, odd sizes included, so packing offsets and alignment are exercised.
SPECS = [((3, 5), torch.float32), ((7,), torch.int64), ((1001,), torch.uint8), ((16, 16), torch.float16)]


def _name(tag: str) -> str:
    return f"adrt_pytest_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _pattern(seq: int, k: int, shape, dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    base = torch.arange(n, dtype=torch.int64).reshape(shape) * (k + 3) + seq * 17
    return (base % 251).to(dtype)


def _parts(tensors):
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-1 if t.dtype != torch.uint8 else 255)


def _run_child(fn, args, queue):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - report everything to the parent
        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _spawn(fn, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_child, args=(fn, args, queue), daemon=True)
    proc.start()
    return proc, queue


def _collect(proc, queue, timeout=120):
    status, value = queue.get(timeout=timeout)
    proc.join(timeout=30)
    assert status == "ok", value
    return value


# ---------------------------------------------------------------------------------------------------------------
def test_build_info_and_lazy_import():
    info = native.build_info()
    for key in ("version", "with_cuda", "with_nccl", "cuda_runtime_version", "nccl_runtime", "runtime_ok"):
        assert key in info
    C = native.load()
    assert C.version() == info["version"]
    if not info["runtime_ok"]:
        with pytest.raises(RuntimeError, match="asyncdiff_rt: "):
            C.check_runtime()
        assert info["runtime_problem"]
    if not info["with_cuda"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            C.NcclComm(b"\0" * 128, 1, 0, 0)
        with pytest.raises(RuntimeError, match="built without CUDA"):
            C.nccl_unique_id()
        with pytest.raises(RuntimeError, match="built without CUDA"):
            C.ShmChannel(_name("nocuda"), 64, True, 0, 1)
    # Importing the package must not load the extension or touch CUDA.
    code = "import sys, asyncdiff_rt; assert 'asyncdiff_rt._C' not in sys.modules; print('lazy')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lazy" in out.stdout, out.stderr


def test_native_missing_module_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "asyncdiff_rt._C":
            raise ImportError("No module named 'asyncdiff_rt._C'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native.importlib, "import_module", lambda n: fake_import(n))
    with pytest.raises(ImportError, match="pip install"):
        native.load()
    assert native.available() is False
    assert native.build_info()["available"] is False


# ---------------------------------------------------------------------------------------------------------------
def _channel_sender(name: str, steps: int, delays: dict[int, float]):
    C = native.load()
    ch = C.ShmChannel(name, capacity=_capacity(C), create=False, device=-1, peer=0, timeout_s=30.0)
    for seq in range(1, steps + 1):
        if seq in delays:
            time.sleep(delays[seq])
        tensors = [_pattern(seq, k, shape, dtype) for k, (shape, dtype) in enumerate(SPECS)]
        ch.send(seq, _parts(tensors))
    ch.close()
    return "sent"


def _capacity(C) -> int:
    return C.ShmChannel.packed_size([(0, torch.empty(s, dtype=d).nbytes) for s, d in SPECS])


def test_shm_channel_two_processes_many_seqs():
    C = native.load()
    name = _name("chan")
    steps = 120
    proc, queue = _spawn(_channel_sender, name, steps, {5: 0.3, 64: 0.2})
    ch = C.ShmChannel(name, capacity=_capacity(C), create=True, device=-1, peer=1, timeout_s=30.0)
    bufs = [torch.empty(shape, dtype=dtype) for shape, dtype in SPECS]
    for seq in range(1, steps + 1):
        if seq == 40:
            time.sleep(0.3)  # a late receiver: the sender must wait for the slot, not overwrite it
        for b in bufs:
            _poison(b)
        ch.recv(seq, _parts(bufs))
        for k, (shape, dtype) in enumerate(SPECS):
            assert torch.equal(bufs[k], _pattern(seq, k, shape, dtype)), (seq, k)
        ch.wait(seq, 1.0)  # no-op on CPU
    assert _collect(proc, queue) == "sent"
    ch.close()
    assert ch.closed


def _open_then_exit(name: str, capacity: int, linger_s: float):
    C = native.load()
    ch = C.ShmChannel(name, capacity=capacity, create=False, device=-1, peer=0, timeout_s=30.0)
    time.sleep(linger_s)
    del ch
    os._exit(0)  # no goodbye: as if the process crashed


def test_shm_channel_dead_peer_raises_naming_peer_and_step():
    C = native.load()
    name = _name("dead")
    proc, _ = _spawn(_open_then_exit, name, 4096, 0.0)
    ch = C.ShmChannel(name, capacity=4096, create=True, device=-1, peer=1, timeout_s=20.0)
    buf = torch.empty(8)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"peer rank 1.*step 1\b.*exited"):
        ch.recv(1, _parts([buf]))
    assert time.monotonic() - t0 < 15.0  # long before the 20 s timeout
    assert ch.failed
    with pytest.raises(RuntimeError, match="failed earlier"):
        ch.recv(2, _parts([buf]))
    proc.join(timeout=30)


def test_shm_channel_silent_peer_times_out():
    C = native.load()
    name = _name("silent")
    proc, _ = _spawn(_open_then_exit, name, 4096, 6.0)
    ch = C.ShmChannel(name, capacity=4096, create=True, device=-1, peer=2, timeout_s=0.5)
    # Wait until the peer has opened (its open unlinks the name), so the timeout below is the recv's own.
    deadline = time.monotonic() + 60
    while os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"peer rank 2.*step 7\b.*timed out after 0.5 s"):
        ch.recv(7, _parts([torch.empty(4)]))
    assert 0.4 < time.monotonic() - t0 < 3.0
    proc.terminate()
    proc.join(timeout=30)


def test_shm_channel_misuse_in_one_process():
    C = native.load()
    name = _name("misuse")
    a = C.ShmChannel(name, 512, True, -1, 1, 2.0)
    b = C.ShmChannel(name, 512, False, -1, 0, 2.0)
    x = torch.arange(100, dtype=torch.float32)  # 400 bytes
    y = torch.zeros(100)
    with pytest.raises(RuntimeError, match="need 912 bytes.*holds 512"):
        a.send(1, _parts([x, x]))
    a.send(1, _parts([x]))
    with pytest.raises(RuntimeError, match="seq must increase"):
        a.send(1, _parts([x]))
    b.recv(1, _parts([y]))
    assert torch.equal(x, y)
    b.abort("test")
    with pytest.raises(RuntimeError, match="peer rank 1 marked the channel failed"):
        a.send(2, _parts([x]))
    a.close()
    a.close()
    b.close()
    assert not os.path.exists(f"/dev/shm/{name}")


# ---------------------------------------------------------------------------------------------------------------
def _transport_rank(rank: int, world: int, store_path: str, steps: int, device: str):
    import torch.distributed as dist

    from asyncdiff_rt.transport.shm import ShmTransport

    store = dist.FileStore(store_path, world)
    tr = ShmTransport(rank, world, store, device=device, timeout_s=30.0)
    peers = [p for p in range(world) if p != rank]

    def payload(step, src, dst):
        return [
            torch.full((4, 3), float(step * 100 + src * 10 + dst), device=device),
            torch.arange(5 + src + dst, dtype=torch.int64, device=device) * (step + 1),
        ]

    tr.prepare({p: payload(0, rank, p) for p in peers}, {p: payload(0, p, rank) for p in peers})
    gathered = tr.all_gather_object({"rank": rank})
    assert [g["rank"] for g in gathered] == list(range(world))
    errors = []
    for step in range(steps):
        sends = {p: payload(step, rank, p) for p in peers if (step + p + rank) % 3 != 0 or step < 2}
        # the matching receives: peer p sends to us under the same rule
        recvs = {
            p: [torch.full_like(t, -1) for t in payload(step, p, rank)]
            for p in peers
            if (step + p + rank) % 3 != 0 or step < 2
        }
        tr.exchange(step, sends, recvs)
        for p, ts in recvs.items():
            for got, want in zip(ts, payload(step, p, rank)):
                if not torch.equal(got.cpu(), want.cpu()):
                    errors.append(f"exchange step {step} from {p}")
        src = step % world
        x = (
            torch.full((2, 1000 + step), float(step), device=device)
            if rank == src
            else torch.zeros(2, 1000 + step, device=device)
        )
        tr.broadcast(x, src=src, step=step)
        if not torch.equal(x.cpu(), torch.full((2, 1000 + step), float(step))):
            errors.append(f"broadcast step {step} from {src}")
        # A non-contiguous receive and a message larger than prepared (the channel grows on both sides).
        if step == steps - 1:
            big = torch.arange(300_000, dtype=torch.float32, device=device) + rank
            out = torch.zeros(600, 500, device=device).t()  # non-contiguous view of 300000 elements
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            tr.exchange(step, {nxt: [big]}, {prv: [out]})
            want = (torch.arange(300_000, dtype=torch.float32) + prv).reshape(500, 600)
            if not torch.equal(out.cpu(), want):
                errors.append("grown non-contiguous exchange")
    tr.synchronize()
    tr.close()
    tr.close()
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_shm_transport_exchange_and_broadcast(tmp_path, world):
    store_path = str(tmp_path / "store")
    procs = [_spawn(_transport_rank, r, world, store_path, 6, "cpu") for r in range(world)]
    results = [_collect(p, q, timeout=180) for p, q in procs]
    assert results == [[]] * world


def _transport_dies(rank: int, world: int, store_path: str):
    import torch.distributed as dist

    from asyncdiff_rt.transport import TransportError
    from asyncdiff_rt.transport.shm import ShmTransport

    store = dist.FileStore(store_path, world)
    tr = ShmTransport(rank, world, store, device="cpu", timeout_s=20.0)
    x = torch.ones(10)
    tr.exchange(0, {1 - rank: [x]}, {1 - rank: [torch.empty(10)]})
    if rank == 1:
        os._exit(0)  # dies before step 1
    t0 = time.monotonic()
    try:
        tr.exchange(1, {1 - rank: [x]}, {1 - rank: [torch.empty(10)]})
    except TransportError as err:
        return str(err), time.monotonic() - t0
    return "no error", 0.0


def test_shm_transport_dead_peer(tmp_path):
    store_path = str(tmp_path / "store")
    (p0, q0), (p1, _) = (_spawn(_transport_dies, r, 2, store_path) for r in range(2))
    message, elapsed = _collect(p0, q0, timeout=120)
    p1.join(timeout=30)
    assert re.search(r"\bstep 1\b", message) and re.search(r"peer rank 1\b", message), message
    assert "exited" in message, message
    assert elapsed < 5.0, elapsed  # the dead pid is noticed within the 20 s timeout, at once


def _from_group_rank(rank: int, world: int, init_file: str):
    import torch.distributed as dist

    from asyncdiff_rt.transport import make_transport

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = make_transport("shm", torch.device("cpu"), None, 30.0)
        sub = make_transport("shm", torch.device("cpu"), dist.new_group([0, 1]), 30.0)  # a second instance
        out = []
        for t in (tr, sub):
            x = torch.full((3,), float(rank))
            y = torch.empty(3)
            t.exchange(0, {1 - rank: [x]}, {1 - rank: [y]})
            out.append(y.tolist())
            out.append(t.broadcast_object({"from": t.rank}, src=1))
            t.close()
        return out
    finally:
        dist.destroy_process_group()


def test_shm_transport_from_group(tmp_path):
    init_file = str(tmp_path / "init")
    procs = [_spawn(_from_group_rank, r, 2, init_file) for r in range(2)]
    r0, r1 = (_collect(p, q) for p, q in procs)
    assert r0 == [[1.0] * 3, {"from": 1}, [1.0] * 3, {"from": 1}]
    assert r1 == [[0.0] * 3, {"from": 1}, [0.0] * 3, {"from": 1}]


def test_nccl_waits_name_the_peer_and_what_they_wait_for():
    """The nccl host wait (no GPU needed for its logic): a peer process on this host that exited is named with
    the step and what was awaited, before the timeout; a silent one times out naming its peers."""
    from asyncdiff_rt.transport import TransportError
    from asyncdiff_rt.transport.nccl import NcclTransport
    from asyncdiff_rt.transport.rendezvous import StoreRendezvous

    class Comm:
        aborted = ""

        def completed(self, seq):
            return False

        def check_async(self, step):
            pass

        def abort(self, reason=""):
            self.aborted = reason

    class C:
        dead: set = set()

        @classmethod
        def process_alive(cls, pid):
            return pid not in cls.dead

    tr = NcclTransport.__new__(NcclTransport)
    tr.rank, tr.world_size, tr.timeout_s, tr._C, tr._comm, tr._watchdog = 0, 3, 0.3, C, Comm(), None
    tr._local_peer_pids = {1: 111, 2: 222}
    tr._rdv = StoreRendezvous(None, 0, 3, "t", 0.3, alive=C.process_alive)
    tr._rdv.where = {1: (socket.gethostname(), 111), 2: (socket.gethostname(), 222)}
    C.dead = {222}
    tr._inflight = [(3, 1, "exchange", (2,))]
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"exchange at step 3 between rank 0 of 3 and peer rank 2: peer rank 2 "):
        tr._throttle(0)
    assert time.monotonic() - t0 < 0.2 and "exited" in tr._comm.aborted
    C.dead = set()
    tr._inflight = [(4, 2, "broadcast from rank 0", (1, 2))]
    with pytest.raises(TransportError, match=r"broadcast from rank 0 at step 4 .* peer ranks 1, 2: did not complete"):
        tr._throttle(0)
    tr._closed = True  # nothing to release
