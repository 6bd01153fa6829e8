"""Start one worker process per rank on this host when not launched by torchrun (the demo, tests).

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), runs
`fn(rank, world_size, *args)` and hands its return value (or its traceback) back through a file. The parent waits
with a deadline and terminates every worker if one fails or the deadline passes: nothing is left hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["spawn", "WorkerError", "free_port"]


class WorkerError(RuntimeError):
    """A worker raised, died or outlived the deadline; the message carries each rank's error."""

    def __init__(self, message: str, errors: dict[int, str], results: list[Any]):
        super().__init__(message)
        self.errors = errors
        self.results = results  # what the ranks that finished returned (None for the others)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_path: str, env: dict, args: tuple) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    threads = max(1, (os.cpu_count() or 1) // world_size)
    # in the environment too: what the worker starts (torchrun, a subprocess) inherits it, and torchrun prints
    # its OMP_NUM_THREADS banner only when the variable is unset
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out_path)


def spawn(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0, env: dict | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh processes; return the results in rank order.

    `fn` must be importable (a module-level function). Raises WorkerError naming the ranks that failed.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="asyncdiff_rt_") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, port, paths[r], dict(env or {}), args), daemon=True)
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C, a signal turned into an exception: leave no worker running
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                if p.pid is not None:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
            raise
        late = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        results, errors = [], {}
        for r, path in enumerate(paths):
            if r in late:
                errors[r] = f"still running after {timeout_s:.0f} s (terminated)"
                results.append(None)
            elif not os.path.exists(path):
                errors[r] = f"died with exit code {procs[r].exitcode}"
                results.append(None)
            else:
                status, value = torch.load(path, weights_only=False)
                if status == "error":
                    errors[r] = value
                    results.append(None)
                else:
                    results.append(value)
        if errors:
            detail = "\n".join(f"--- rank {r}: {msg}" for r, msg in sorted(errors.items()))
            raise WorkerError(f"{len(errors)} of {world_size} worker(s) failed:\n{detail}", errors, results)
        return results
