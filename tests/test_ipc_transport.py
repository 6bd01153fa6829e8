"""The `ipc` transport on a CPU machine: asking for it where CUDA IPC cannot work is refused with the problem and
the fix, `auto` on a CPU still picks gloo, and the pure selection logic (select.py) decides as documented
(docs/transports.md, "Choosing"). The transport itself runs in tests/cuda/test_ipc_cuda.py."""

from __future__ import annotations

import threading

import pytest
import torch

from asyncdiff_rt.transport import TRANSPORTS, TransportError, resolve
from asyncdiff_rt.transport import select as sel

CPU = torch.device("cpu")
CUDA0 = torch.device("cuda", 0)  # a device object only: nothing here touches CUDA


def test_ipc_is_a_transport_name():
    assert "ipc" in TRANSPORTS


def test_ipc_on_cpu_is_refused_with_the_fix():
    with pytest.raises(TransportError, match=r"device is cpu: use transport='shm'"):
        resolve("ipc", CPU)


def test_asyncdiff_ipc_on_cpu_is_refused_before_any_process_group():
    import torch.distributed as dist
    from toy import ToyPipeline

    import asyncdiff_rt

    with pytest.raises(TransportError, match=r"CUDA IPC.*use transport='shm'"):
        asyncdiff_rt.AsyncDiff(ToyPipeline(6), plan=[["A"], ["B", "C"]], warm_up=1, transport="ipc")
    assert not (dist.is_available() and dist.is_initialized())


def test_ipc_transport_class_on_cpu_is_refused():
    import torch.distributed as dist

    from asyncdiff_rt.transport.ipc import IpcTransport

    with pytest.raises(TransportError, match="use transport='shm'"):
        IpcTransport(0, 2, dist.HashStore(), device="cpu", timeout_s=1.0)


def test_native_ipc_channel_needs_a_device():
    from asyncdiff_rt import native

    if not native.available():
        pytest.skip("asyncdiff_rt._C not built")
    C = native.load()
    assert issubclass(C.IpcChannel, C.ShmChannel)
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        C.IpcChannel("adrt_ipc_cpu_probe", 4096, True, -1, 1, 1.0)


def test_auto_on_cpu_still_picks_gloo():
    assert resolve("auto", CPU) == "gloo"
    assert sel.process_group_backend(CPU, "auto", {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}) == "gloo"


@pytest.mark.parametrize(
    "transport,env,backend",
    [
        ("nccl", {}, "nccl"),
        ("auto", {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}, "gloo"),  # auto may pick ipc: ranks may share a GPU
        ("auto", {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}, "nccl"),  # several hosts: ipc cannot apply
        ("auto", {}, "nccl"),  # not launched by torchrun: where the ranks run is unknown
        ("ipc", {}, "gloo"),
        ("shm", {}, "gloo"),
    ],
)
def test_process_group_backend(transport, env, backend):
    assert sel.process_group_backend(CUDA0, transport, env) == backend


def report(host="h", gpu="GPU-a", device="cuda:0", refusal=""):
    return {"host": host, "device": device, "gpu": gpu, "refusal": refusal}


VISIBLE = {"GPU-a": 0, "GPU-b": 1}


def test_same_gpu_needs_no_peer_access():
    reports = [report(), report(), report()]
    assert [sel.ipc_problem(r, reports, VISIBLE, lambda a, b: False) for r in range(3)] == ["", "", ""]


def test_peer_access_decides_between_gpus():
    reports = [report(gpu="GPU-a"), report(gpu="GPU-b", device="cuda:1")]
    assert sel.ipc_problem(0, reports, VISIBLE, lambda a, b: True) == ""
    problem = sel.ipc_problem(0, reports, VISIBLE, lambda a, b: False)
    assert "cuda:0 has no peer access to rank 1's GPU cuda:1" in problem and "transport='shm'" in problem


def test_other_hosts_and_invisible_gpus_and_refusals_are_named():
    two_hosts = [report(host="h1"), report(host="h2")]
    assert "different hosts (h1, h2)" in sel.ipc_problem(0, two_hosts, VISIBLE, lambda a, b: True)
    hidden = [report(gpu="GPU-a"), report(gpu="GPU-z", device="cuda:0")]
    assert "not visible to rank 0" in sel.ipc_problem(0, hidden, VISIBLE, lambda a, b: True)
    refused = [report(), report(gpu=None, device="cpu", refusal="the device is cpu")]
    assert sel.ipc_problem(0, refused, VISIBLE, lambda a, b: True) == "rank 1: the device is cpu"
    assert sel.ipc_problem(1, refused, VISIBLE, lambda a, b: True) == "rank 1: the device is cpu"


def test_agreement_is_the_same_on_every_rank_when_access_is_one_sided(monkeypatch):
    """Rank 1 cannot reach rank 0's GPU, rank 0 can reach rank 1's: both ranks must see rank 1's verdict."""
    import torch.distributed as dist

    from asyncdiff_rt.transport.rendezvous import StoreRendezvous

    gpus = {0: "GPU-a", 1: "GPU-b"}
    monkeypatch.setattr(sel, "rank_report", lambda device: report(gpu=gpus[device.index], device=str(device)))
    monkeypatch.setattr(sel, "visible_gpus", lambda: dict(VISIBLE))
    monkeypatch.setattr(sel, "_can_access", lambda a, b: (a, b) == (0, 1))
    store = dist.HashStore()
    out: dict[int, list[str]] = {}

    def rank(r: int) -> None:
        rdv = StoreRendezvous(store, r, 2, "test/ipc", 10.0)
        out[r] = sel.agree_ipc(rdv, r, torch.device("cuda", r), "test agreement")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert out[0] == out[1]
    assert out[0][0] == "" and "rank 1's GPU cuda:1 has no peer access to rank 0's GPU cuda:0" in out[0][1]
