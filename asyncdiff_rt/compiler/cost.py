"""Block costs, measured: each block timed alone at its real input shapes on the target device.

The "measured" cost model of docs/architecture.md#compiler; flops.py is the one that needs no timing.

One forward captures every block's inputs (args and kwargs, cloned, first call only); then each block runs again
and again on them. CUDA: CUDA events and the median, by default as a CUDA-graph replay (eager diffusers is bound
by kernel launches, while the runtime replays graphs: 2-3.5x faster on an H100); a block that cannot be captured
falls back to eager timing and says so in ``modes``. CPU: ``time.perf_counter`` and the minimum (interference from other
processes only adds time there).

Results are cached on disk as JSON, under ``$ASYNCDIFF_RT_CACHE`` or ``~/.cache/asyncdiff_rt/costs/``, keyed by
the architecture (class, config, module tree with parameter shapes), the block list, the input shapes and dtypes,
the parameter dtype, the device name, the timing mode and the torch version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BlockCosts", "measure_block_costs", "cost_cache_dir", "cost_cache_key", "device_name", "arch_hash"]


class BlockCosts(dict):
    """block name -> milliseconds per call (times the number of calls per forward), plus how it was obtained."""

    def __init__(self, block_ms: dict[str, float], **info: Any):
        super().__init__(block_ms)
        self.denoiser_ms: float | None = info.get("denoiser_ms")
        self.from_cache: bool = info.get("from_cache", False)
        self.device_name: str = info.get("device_name", "")
        self.mode: str = info.get("mode", "")
        self.key: str = info.get("key", "")
        self.modes: dict[str, str] = info.get("modes", {})  # per block: "graph" or "eager" (fallback)

    def info(self) -> dict[str, Any]:
        return {
            "denoiser_ms": self.denoiser_ms,
            "from_cache": self.from_cache,
            "device_name": self.device_name,
            "mode": self.mode,
            "key": self.key,
        }


# --------------------------------------------------------------------------------------------------- the cache key
def cost_cache_dir() -> Path:
    env = os.environ.get("ASYNCDIFF_RT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "asyncdiff_rt" / "costs"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{platform.processor() or 'unknown'}:{os.cpu_count()}cores"


def arch_hash(denoiser: nn.Module) -> str:
    """Class, config and module tree (names, types, parameter shapes) of the denoiser."""
    h = hashlib.sha256()
    h.update(f"{type(denoiser).__module__}.{type(denoiser).__qualname__}".encode())
    config = getattr(denoiser, "config", None)
    if config is not None:
        items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    for name, module in denoiser.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, p in denoiser.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:20]


def _signature(tree: Any) -> Any:
    def leaf(x):
        if isinstance(x, torch.Tensor):
            return ["tensor", list(x.shape), str(x.dtype)]
        if isinstance(x, (bool, int, float, str)) or x is None:
            return repr(x)
        return type(x).__name__

    return [leaf(x) for x in pytree.tree_leaves(tree)]


def cost_cache_key(denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str], device, mode: str) -> dict:
    dtype = next((p.dtype for p in denoiser.parameters()), torch.float32)
    fields = {
        "arch": arch_hash(denoiser),
        "class": type(denoiser).__name__,
        "blocks": list(blocks),
        "inputs": _signature((args, kwargs)),
        "dtype": str(dtype),
        "device": device_name(device),
        "mode": mode,
        "torch": torch.__version__.split("+")[0],
    }
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return fields


# --------------------------------------------------------------------------------------------------- timing
def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _capture_inputs(denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str]) -> tuple[dict, dict]:
    modules = dict(denoiser.named_modules())
    inputs: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook_for(name):
        def hook(module, a, k):
            calls[name] = calls.get(name, 0) + 1
            if name not in inputs:
                inputs[name] = _clone((a, k))

        return hook

    try:
        for b in blocks:
            handles.append(modules[b].register_forward_pre_hook(hook_for(b), with_kwargs=True))
        with torch.no_grad():
            denoiser(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return inputs, calls


def _time_cpu(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    # the minimum, not the median: on a shared CPU (CI, oversubscribed cores) interference only ever adds time,
    # and one descheduled OpenMP thread stalls a whole op
    return min(times)


def _time_cuda_eager(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _time_cuda_graph(fn, repeats: int, warmup: int, eager_ms: float) -> float:
    # Several calls per graph for small blocks, so the replay's own launch cost (a few µs) does not dominate.
    inner = max(1, min(20, math.ceil(0.5 / max(eager_ms, 1e-3))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ms = _time_cuda_eager(graph.replay, repeats, 1) / inner
    del graph
    return ms


def measure_block_costs(
    denoiser: nn.Module,
    args: tuple,
    kwargs: dict,
    blocks: list[str],
    trace: Any = None,
    device: torch.device | str | None = None,
    repeats: int = 20,
    warmup: int = 3,
    mode: str = "auto",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    measure_denoiser: bool = True,
) -> BlockCosts:
    """Time every block of ``blocks`` alone on ``device`` at the inputs ``denoiser(*args, **kwargs)`` gives it.

    ``mode``: "auto" (CUDA: "graph"; CPU: "eager"), "graph" or "eager". ``trace`` is accepted for blocks it
    never saw called (they cost 0) and may be None. ``measure_denoiser`` also times the whole forward, to show how
    much the glue costs. Returns a ``BlockCosts`` (a dict block -> ms).
    """
    kwargs = dict(kwargs or {})
    if device is None:
        device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("block costs need a real device: trace on meta, but measure on the target GPU or CPU")
    if mode == "auto":
        mode = "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        mode = "eager"
    key = cost_cache_key(denoiser, args, kwargs, blocks, device, mode)
    path = Path(cache_dir) if cache_dir is not None else cost_cache_dir()
    path = path / f"{key['key']}.json"
    if cache and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("fields", {}).get("key") == key["key"] and set(data["block_ms"]) == set(blocks):
                return BlockCosts(
                    data["block_ms"],
                    denoiser_ms=data.get("denoiser_ms"),
                    from_cache=True,
                    device_name=key["device"],
                    mode=mode,
                    key=key["key"],
                    modes=data.get("modes", {}),
                )
        except (OSError, ValueError, KeyError):
            pass  # a broken cache file is measured again and overwritten

    inputs, calls = _capture_inputs(denoiser, args, kwargs, blocks)
    modules = dict(denoiser.named_modules())
    cuda = device.type == "cuda"
    block_ms: dict[str, float] = {}
    modes: dict[str, str] = {}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with diffusers; a bare torch install still works
        tqdm = None
    iterator = blocks
    bar = None
    if tqdm is not None and progress is not False:
        # progress=None: only on a terminal (not in CI logs), from the start: on a CPU a block can take seconds
        disable = None if progress is None else not progress
        bar = tqdm(blocks, desc=f"timing blocks on {device.type}", unit="block", leave=False, disable=disable)
        iterator = bar
    with torch.no_grad():
        for name in iterator:
            if name not in inputs:  # never called in this forward
                block_ms[name] = 0.0
                modes[name] = "not called"
                continue
            module = modules[name]
            a, k = inputs[name]

            def fn(module=module, a=a, k=k):
                return module(*a, **k)

            if not cuda:
                ms = _time_cpu(fn, repeats, warmup)
                modes[name] = "eager"
            else:
                ms = _time_cuda_eager(fn, max(3, repeats // 4), warmup)
                modes[name] = "eager"
                if mode == "graph":
                    try:
                        ms = _time_cuda_graph(fn, repeats, warmup, ms)
                        modes[name] = "graph"
                    except Exception as exc:  # capture failed (host sync in the block, ...): eager figure stands
                        modes[name] = f"eager ({type(exc).__name__})"
                        torch.cuda.synchronize()
            block_ms[name] = ms * calls.get(name, 1)
        whole = None
        if measure_denoiser:

            def forward():
                return denoiser(*args, **kwargs)

            if not cuda:
                whole = _time_cpu(forward, max(3, repeats // 4), 1)
            else:
                whole = _time_cuda_eager(forward, max(3, repeats // 4), 2)
                if mode == "graph":
                    try:
                        whole = _time_cuda_graph(forward, max(5, repeats // 2), 2, whole)
                    except Exception:
                        pass
    if bar is not None:
        bar.close()
    del inputs
    costs = BlockCosts(
        block_ms, denoiser_ms=whole, from_cache=False, device_name=key["device"], mode=mode, key=key["key"], modes=modes
    )
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(
                json.dumps(
                    {"fields": key, "block_ms": block_ms, "denoiser_ms": whole, "modes": modes, "created": time.time()},
                    indent=1,
                )
            )
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home still plans, just without the cache
    return costs
