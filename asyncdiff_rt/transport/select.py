"""Where the `ipc` transport applies, and what `transport="auto"` picks (docs/transports.md, "Choosing").

CUDA IPC works between processes of one host whose GPUs are the same device (processes sharing a GPU, under MPS or
time-sliced) or have peer access. `ipc_refusal` says what this process lacks (a CUDA device, a CUDA build of the
native extension); `ipc_problem` decides one rank's side from what every rank reported (pure: unit-tested on
CPU); `agree_ipc` gathers the reports and then the verdicts through the store, so that every rank takes the same
decision even where peer access is not symmetric; `choose_auto` is `auto`'s choice on CUDA: ipc where the ranks
share one GPU (measured faster than shm there; nccl cannot run two ranks on one GPU), nccl between GPUs (ipc there
is not measured against it yet).
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from .. import native

__all__ = [
    "ipc_refusal",
    "rank_report",
    "ipc_problem",
    "agree_ipc",
    "choose_auto",
    "process_group_backend",
]

_rounds = itertools.count()  # auto's agreements: every rank makes them in the same order


def ipc_refusal(device: torch.device) -> str:
    """'' when this process can run the ipc transport on `device`; else the problem and the fix."""
    if device.type != "cuda":
        return (
            f"the ipc transport moves CUDA tensors between processes through CUDA IPC, but the device is {device}: "
            "use transport='shm' (or 'gloo') for CPU tensors"
        )
    info = native.build_info()
    if not info.get("available", False):
        return f"the ipc transport needs the native extension ({info.get('error')}); or use transport='gloo'"
    if not info.get("with_cuda", False):
        return (
            "the ipc transport needs asyncdiff_rt._C built with CUDA, but it was built without: rebuild it "
            "(scripts/device_build.sh), or use transport='gloo'"
        )
    if not info.get("runtime_ok", False):
        return f"the ipc transport needs a usable CUDA runtime: {info.get('runtime_problem')}; use transport='gloo'"
    return ""


def _gpu_id(index: int) -> str:
    """A name of the physical GPU that means the same in every process (its UUID), whatever each one sees."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else f"index {index}"


def visible_gpus() -> dict[str, int]:
    """The GPUs this process sees: physical id -> local index."""
    if not torch.cuda.is_available():
        return {}
    return {_gpu_id(i): i for i in range(torch.cuda.device_count())}


def rank_report(device: torch.device) -> dict[str, Any]:
    """What a rank tells the others: its host, device type, physical GPU and what it lacks for ipc."""
    refusal = ipc_refusal(device)
    gpu = None
    if device.type == "cuda" and not refusal:
        gpu = _gpu_id(device.index if device.index is not None else torch.cuda.current_device())
    return {"host": socket.gethostname(), "device": str(device), "gpu": gpu, "refusal": refusal}


def ipc_problem(rank: int, reports: list[dict], visible: dict[str, int], can_access: Callable[[int, int], bool]) -> str:
    """'' when rank `rank` can exchange with every other rank through CUDA IPC; else the first problem and its fix.
    `visible`: this rank's GPUs (physical id -> local index); `can_access(a, b)`: peer access from local GPU a to b."""
    me = reports[rank]
    if me["refusal"]:
        return f"rank {rank}: {me['refusal']}"
    for r, other in enumerate(reports):
        if r == rank:
            continue
        if other["host"] != me["host"]:
            return (
                f"ranks {rank} and {r} run on different hosts ({me['host']}, {other['host']}): CUDA IPC works between "
                "the processes of one host; use transport='nccl'"
            )
        if other["refusal"]:
            return f"rank {r}: {other['refusal']}"
        if other["gpu"] == me["gpu"]:
            continue  # one GPU shared by several processes
        mine, theirs = visible.get(me["gpu"]), visible.get(other["gpu"])
        if mine is None or theirs is None:
            return (
                f"rank {r}'s GPU ({other['device']}, {other['gpu']}) is not visible to rank {rank}, which cannot check "
                "peer access to it: make every rank's GPUs visible to every rank (CUDA_VISIBLE_DEVICES), or use "
                "transport='nccl'"
            )
        if not can_access(mine, theirs):
            return (
                f"rank {rank}'s GPU cuda:{mine} has no peer access to rank {r}'s GPU cuda:{theirs}: CUDA IPC needs "
                "the same GPU or GPUs with peer access; use transport='shm' (or 'nccl')"
            )
    return ""


def _can_access(a: int, b: int) -> bool:
    return bool(torch.cuda.can_device_access_peer(a, b))


def agree_ipc(rdv: Any, rank: int, device: torch.device, phase: str) -> list[str]:
    """Every rank's verdict (`ipc_problem`), the same list on every rank; `rdv`: a StoreRendezvous of the ranks."""
    return _reports_and_verdicts(rdv, rank, device, phase)[1]


def _reports_and_verdicts(rdv: Any, rank: int, device: torch.device, phase: str) -> tuple[list[dict], list[str]]:
    reports = rdv.all_gather(rank_report(device), f"{phase} (devices)")
    visible = visible_gpus() if device.type == "cuda" else {}
    problem = ipc_problem(rank, reports, visible, _can_access)
    return reports, rdv.all_gather(problem, f"{phase} (verdicts)")


def choose_auto(device: torch.device, group: Any, timeout_s: float, fallback: str) -> tuple[str, str]:
    """`auto` on CUDA once the process group exists: ("ipc", why) where CUDA IPC works between every pair of ranks,
    else (fallback, why not). Every rank gets the same answer."""
    import torch.distributed as dist

    from .rendezvous import StoreRendezvous, group_store

    if dist.get_world_size(group) < 2:
        return fallback, "a world of one"
    store, rank, world = group_store(group, "auto")
    rdv = StoreRendezvous(store, rank, world, f"choice/{next(_rounds)}", timeout_s, alive=None)
    reports, verdicts = _reports_and_verdicts(rdv, rank, device, "the choice of transport='auto'")
    bad = [v for v in verdicts if v]
    if bad:
        return fallback, bad[0]
    if len({r["gpu"] for r in reports}) > 1:
        # ipc works between GPUs with peer access (transport="ipc"), but only one shared GPU has been measured
        # against the alternatives (benchmarks/results/emulated_*): between GPUs auto keeps NCCL until it is
        return fallback, "the ranks are on several GPUs (ipc there is not measured against nccl yet)"
    return "ipc", "every rank on this host, on one GPU (several processes sharing it)"


def process_group_backend(device: torch.device, transport: str, env: dict[str, str] | None = None) -> str:
    """The backend of a process group asyncdiff_rt creates itself: NCCL for the nccl transport on CUDA, and for
    `auto` on CUDA across hosts; gloo otherwise. `auto` on one host may pick ipc, where several ranks can share one
    GPU and NCCL's collectives refuse that: the group's own (CPU) agreement then runs on gloo."""
    if device.type != "cuda":
        return "gloo"
    if transport == "nccl":
        return "nccl"
    if transport == "auto":
        env = os.environ if env is None else env
        one_host = env.get("LOCAL_WORLD_SIZE") is not None and env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE")
        return "gloo" if one_host else "nccl"
    return "gloo"
