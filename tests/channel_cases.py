"""What the native channel tests on a GPU share (tests/cuda/test_shm_cuda.py, tests/cuda/test_ipc_cuda.py): the
message layout, its deterministic contents, the extension loaded with CUDA, and one child process per side."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from asyncdiff_rt import native

# one message: parts of several dtypes and sizes, the last large enough to need several copy chunks
SPECS = [((3, 5), torch.float32), ((7,), torch.int64), ((1001,), torch.uint8), ((256, 1024), torch.float16)]


def cuda_native():
    """asyncdiff_rt._C built with CUDA, on a machine with a usable GPU (else the test is skipped)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not native.available():
        pytest.skip("asyncdiff_rt._C not built (scripts/device_build.sh)")
    mod = native.load()
    info = mod.build_info()
    if not info["with_cuda"]:
        pytest.fail(f"asyncdiff_rt._C was built without CUDA on a GPU machine: {info}")
    mod.check_runtime()
    return mod


def pattern(seq: int, k: int, shape, dtype, device="cuda") -> torch.Tensor:
    """Part k of message seq: contents that differ per part and per message."""
    n = 1
    for s in shape:
        n *= s
    base = torch.arange(n, dtype=torch.int64, device=device).reshape(shape) * (k + 3) + seq * 17
    return (base % 251).to(dtype)


def parts(tensors):
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]


def capacity(C) -> int:
    return C.ShmChannel.packed_size([(0, torch.empty(s, dtype=d).nbytes) for s, d in SPECS])


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _run_child(fn, args, queue):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001
        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def spawn(fn, *args):
    """`fn(*args)` in a fresh (spawned) process; `collect` its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_child, args=(fn, args, queue), daemon=True)
    proc.start()
    return proc, queue


def collect(proc, queue, timeout=180):
    status, value = queue.get(timeout=timeout)
    proc.join(timeout=30)
    assert status == "ok", value
    return value


def transport_dies(rank: int, store_path: str, host_sync_first: bool, kind: str):
    """Over the `kind` transport ("shm" or "ipc") on cuda:0: rank 1 exits after step 0; rank 0 must raise
    TransportError naming peer rank 1 and step 1, and its GPU must stay usable afterwards (the released copies may
    have touched memory of a process that is gone). Rank 0 returns (message, seconds waited, healthy, problem)."""
    import torch.distributed as dist

    from asyncdiff_rt.transport import TransportError
    from asyncdiff_rt.transport.ipc import IpcTransport
    from asyncdiff_rt.transport.shm import ShmTransport

    torch.cuda.set_device(0)
    cls = {"ipc": IpcTransport, "shm": ShmTransport}[kind]
    tr = cls(rank, 2, dist.FileStore(store_path, 2), device="cuda:0", timeout_s=5.0)
    x = torch.ones(10, device="cuda")
    tr.exchange(0, {1 - rank: [x]}, {1 - rank: [torch.empty(10, device="cuda")]})
    tr.synchronize()
    if rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        for step in range(1, 4):
            y = torch.empty(10, device="cuda")
            tr.exchange(step, {1 - rank: [x]}, {1 - rank: [y]})
            if host_sync_first:
                y.cpu()  # a host sync outside the transport: the watchdog must release the blocked stream
        tr.synchronize()
    except TransportError as err:
        waited = time.monotonic() - t0
        try:
            torch.cuda.synchronize()  # released
            healthy = float((torch.arange(4, device="cuda") * 2).sum().item()) == 12.0
            problem = ""
        except Exception as cuda_err:  # noqa: BLE001 - the test reports it
            healthy, problem = False, f"{type(cuda_err).__name__}: {cuda_err}"
        tr.close()
        return str(err), waited, healthy, problem
    return "no error", 0.0, True, ""
