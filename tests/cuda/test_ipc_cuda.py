"""The `ipc` transport on one GPU: the native IpcChannel between two processes (device slots shared through CUDA
IPC, flags in page-locked shared memory), a dead or silent peer, CUDA-graph capture replayed across processes, the
IpcTransport between 2 and 3 processes (poisoned receive buffers, growth, a stalled rank, a dead peer), and
AsyncDiff over `ipc` (and over `auto`, which picks it here) equal to the simulator, eager and with CUDA graphs.
Run with `pytest -m cuda tests/cuda/test_ipc_cuda.py` on a GPU machine after scripts/device_build.sh.
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
    return f"adrt_ipc_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------------------------------------------------
def _sender(name: str, create: bool, steps: int, delays: dict[int, float]):
    C = native.load()
    torch.cuda.set_device(0)
    ch = C.IpcChannel(name, capacity=_capacity(C), create=create, device=0, peer=0, timeout_s=60.0)
    keep = []
    for seq in range(1, steps + 1):
        if seq in delays:
            torch.cuda.synchronize()
            time.sleep(delays[seq])
        tensors = [_pattern(seq, k, shape, dtype) for k, (shape, dtype) in enumerate(SPECS)]
        ch.send(seq, _parts(tensors), _stream())
        keep.append(tensors)  # alive until the copies ran
        if len(keep) > 4:
            ch.wait(seq - 3, 60.0)
            keep.pop(0)
    ch.wait(steps, 60.0)
    ch.close()  # a creator waits here for the receiver to close its mapping (Note [ipc teardown])
    return "sent"


@pytest.mark.parametrize("receiver_creates", [False, True], ids=["sender_exports", "receiver_exports"])
def test_ipc_channel_two_processes(C, receiver_creates):
    name = _name("chan")
    steps = 40
    proc, queue = _spawn(_sender, name, not receiver_creates, steps, {3: 0.3, 25: 0.2})
    ch = C.IpcChannel(name, capacity=_capacity(C), create=receiver_creates, device=0, peer=1, timeout_s=60.0)
    bufs = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in SPECS]
    for seq in range(1, steps + 1):
        for b in bufs:
            b.fill_(float("nan") if b.is_floating_point() else 77)
        ch.recv(seq, _parts(bufs), _stream())
        if seq == 15:
            time.sleep(0.3)  # a late host: the GPU side must still be correct
        for k, (shape, dtype) in enumerate(SPECS):
            assert torch.equal(bufs[k], _pattern(seq, k, shape, dtype)), (seq, k)
    ch.wait(steps, 30.0)
    ch.close()  # before the sender returns: an exporting sender waits for this side's close
    assert _collect(proc, queue) == "sent"


def _open_and_idle(name: str, capacity: int, linger_s: float, die: bool):
    C = native.load()
    torch.cuda.set_device(0)
    ch = C.IpcChannel(name, capacity=capacity, create=False, device=0, peer=0, timeout_s=30.0)
    time.sleep(linger_s)
    if die:
        os._exit(0)
    del ch
    return "idle"


@pytest.mark.parametrize("die", [True, False], ids=["dead_peer", "silent_peer"])
def test_ipc_channel_timeout_releases_stream(C, die):
    name = _name("stall")
    proc, _ = _spawn(_open_and_idle, name, 4096, 0.5 if die else 20.0, die)
    ch = C.IpcChannel(name, capacity=4096, create=True, device=0, peer=1, timeout_s=60.0)
    while os.path.exists(f"/dev/shm/{name}"):  # until the peer opened (it unlinks the name)
        time.sleep(0.05)
    buf = torch.zeros(16, device="cuda")
    ch.recv(3, _parts([buf]), _stream())  # the stream now waits for a message that never comes
    after = buf + 1
    t0 = time.monotonic()
    pattern = r"ipc channel.*peer rank 1.*step 3\b.*exited" if die else r"ipc channel.*peer rank 1.*step 3\b.*timed out"
    with pytest.raises(RuntimeError, match=pattern):
        ch.wait(3, 10.0 if die else 1.0)
    assert time.monotonic() - t0 < 9.0
    torch.cuda.synchronize()  # released
    # Nothing was sent: the released recv copied the zero-filled device slot, the work behind it ran after.
    assert torch.equal(buf.cpu(), torch.zeros(16)), buf
    assert torch.equal(after.cpu(), torch.ones(16)), after
    assert ch.failed
    with pytest.raises(RuntimeError, match="failed earlier"):
        ch.recv(4, _parts([buf]), _stream())
    ch.close()  # silent peer: the exporter gives up waiting for its close after a short grace (and leaks)
    proc.terminate()
    proc.join(timeout=30)


def test_ipc_channel_in_one_process_is_refused(C):
    name = _name("self")
    a = C.IpcChannel(name, 1 << 16, True, 0, 1, 5.0)
    with pytest.raises(RuntimeError, match=r"CUDA IPC"):
        C.IpcChannel(name, 1 << 16, False, 0, 0, 5.0)  # CUDA IPC cannot open a handle in its own process
    a.close()


# ---------------------------------------------------------------------------------------------------------------
def _graph_side(name: str, create: bool, replays: int):
    C = native.load()
    torch.cuda.set_device(0)
    ch = C.IpcChannel(name, 1 << 20, create, 0, 1 if create else 0, 60.0)
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
        ch.close()
        return "sent"
    got = []
    ch.recv(1, _parts([buf]), _stream())
    got.append(float(buf.mean()))
    with torch.cuda.graph(g):
        ch.recv(2, _parts([buf]), torch.cuda.current_stream().cuda_stream)
    for _ in range(replays):
        g.replay()
        got.append(float(buf.min()) if float(buf.min()) == float(buf.max()) else float("nan"))
    torch.cuda.synchronize()
    ch.close()
    return got


def test_ipc_graph_capture_replayed_across_processes(C):
    name = _name("graph")
    replays = 8
    sender = _spawn(_graph_side, name, True, replays)
    receiver = _spawn(_graph_side, name, False, replays)
    assert _collect(*receiver) == [-1.0] + [float(i) for i in range(replays)]
    assert _collect(*sender) == "sent"


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_ipc_transport_cuda(C, tmp_path, world):
    from ipc_cases import transport_rank

    store_path = str(tmp_path / "store")
    delay = (world - 1, 7, 0.5)  # the last rank stalls its host at step 7
    procs = [_spawn(transport_rank, r, world, store_path, 14, delay) for r in range(world)]
    results = [_collect(p, q) for p, q in procs]
    assert [errors for errors, _, _ in results] == [[]] * world
    for _, generations, _ in results:  # messages grew twice: generations 0, 1, 2 of every channel
        assert set(generations.values()) == {2}, generations


@pytest.mark.parametrize("world", [2, 3])
def test_ipc_transport_cuda_in_pieces(C, tmp_path, world):
    """With a 256 KiB slot cap the messages of steps >= 5 (338 KB, then 3.4 MB per peer) travel in pieces
    (transport/shm.py, Note [slot cap]): every receive still lands, and the channels grow once, to the cap."""
    from ipc_cases import transport_rank

    store_path = str(tmp_path / "store")
    procs = [_spawn(transport_rank, r, world, store_path, 14, (world - 1, 7, 0.5), "0.25") for r in range(world)]
    results = [_collect(p, q) for p, q in procs]
    assert [errors for errors, _, _ in results] == [[]] * world
    for _, generations, capacities in results:
        assert set(generations.values()) == {1}, generations
        assert max(capacities) <= 256 * 1024, capacities


@pytest.mark.parametrize("host_sync_first", [False, True], ids=["transport_sync", "host_sync"])
def test_ipc_transport_dead_peer(C, tmp_path, host_sync_first):
    store_path = str(tmp_path / "store")
    p0, p1 = (_spawn(transport_dies, r, store_path, host_sync_first, "ipc") for r in range(2))
    message, waited, healthy, problem = _collect(*p0)
    p1[0].join(timeout=30)
    assert re.search(r"peer rank 1\b", message) and re.search(r"\bstep 1\b", message), message
    assert "exited" in message, message
    assert waited < 5.0 + 3, waited  # the transport's timeout is 5 s; the dead pid is noticed before it
    assert healthy, f"CUDA unusable after the dead peer was released: {problem}"


# ---------------------------------------------------------------------------------------------------------------
SD15_PLAN = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
    ["down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"],
    ["up_blocks.2", "up_blocks.3", "conv_out"],
]
SD15_TWO = [SD15_PLAN[0], SD15_PLAN[1] + SD15_PLAN[2]]


def _simulated(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from asyncdiff_rt import simulate
    from asyncdiff_rt.tiny import call_kwargs, make_pipeline, output_of

    pipe = make_pipeline(case["kind"], device="cuda")
    kw = call_kwargs(case["kind"], steps=case["steps"], seed=0, device="cuda")
    kw["output_type"] = "latent"
    expected = output_of(simulate(pipe, plan=case["plan"], warm_up=case["warm_up"], **kw)).cpu()
    return expected, output_of(pipe(**kw)).cpu()


@pytest.mark.parametrize("world", [2, 3])
def test_processes_on_one_gpu_over_ipc_equal_simulator(C, world):
    """AsyncDiff between processes sharing the GPU through CUDA IPC: eager, CUDA graphs, a stalled rank, `auto`."""
    from dist_cases import exact_gpu_math, run_cases

    from asyncdiff_rt.tools.launch import spawn

    exact_gpu_math()  # the workers run without TF32; the simulator here must too
    base = dict(kind="sd15", plan=SD15_TWO if world == 2 else SD15_PLAN, steps=6, device="cuda", warm_up=2)
    cases = [
        dict(base, transport="ipc", graphs=False),
        dict(base, transport="ipc", graphs=True),
        dict(base, transport="ipc", graphs=True, delay_rank=(world - 1, 0.5)),
        dict(base, transport="auto", graphs=True),
    ]
    results = spawn(run_cases, world, cases, timeout_s=300)
    expected, exact = _simulated(base)
    for i, case in enumerate(cases):
        got = results[0][i]
        assert got["status"] == "ok", (case, got)
        assert all(r[i].get("transport") == "ipc" for r in results), [r[i].get("transport") for r in results]
        if case["graphs"]:
            assert got["captures"] > 0, f"no graph was captured: {case}"
        torch.testing.assert_close(got["outputs"][0], expected, rtol=1e-4, atol=1e-4)
    assert (results[0][0]["outputs"][0] - exact).abs().max() > 1e-3  # asynchronous, not the exact loop
    torch.testing.assert_close(results[0][1]["outputs"][0], results[0][0]["outputs"][0], rtol=1e-4, atol=1e-4)
