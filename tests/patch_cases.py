"""Worker side of the PatchParallel tests (tests/test_patch_parallel.py). Pipelines in float64, so that the
runtime and the simulator (`asyncdiff_rt.simulate(strategy="patch")`), which sum the same values in other orders,
agree to ~1e-12, far below what a wrong halo, slot or moment moves.

A case: kind, size (the call's height and width), steps, warm_up, sync_mode, transport, calls (pipeline calls in
a row), kill_rank (that rank exits at step 2), timeout_s, rank_mode (sync_mode per rank), patches, call (extra
call kwargs), device ("cuda": float32 without TF32, tests/cuda/test_patch_cuda.py), dtype (on CUDA: "float64"),
graphs (PatchParallel's), env (environment variables set for the case, e.g. the transports' slot cap).
Every rank returns per case ("ok", [latents per call, on the CPU], bytes per step, graphs captured, whether the K/V
went as puts) or ("error", type, message).
"""

from __future__ import annotations

import torch
from spawn_cases import DTYPE, call_kwargs, latents, pipe_of  # noqa: F401 - the workers' shared part


def run_cases(rank: int, world: int, cases: list[dict]) -> list:
    torch.set_num_threads(1)
    from dist_cases import set_case_env

    from asyncdiff_rt import PatchParallel

    results = []
    for case in cases:
        pipe = pipe_of(case["kind"], case.get("device", "cpu"), case.get("dtype"))
        pp = None
        restore_env = set_case_env(case)
        try:
            mode = case["rank_mode"][rank] if "rank_mode" in case else case.get("sync_mode", "corrected_async_gn")
            pp = PatchParallel(
                pipe,
                warm_up=case.get("warm_up", 2),
                sync_mode=mode,
                transport=case.get("transport", "gloo"),
                timeout_s=case.get("timeout_s", 60),
                patches=case.get("patches"),
                debug=case.get("debug", False),
                cfg_parallel=case.get("cfg", False),
                graphs=case.get("graphs"),
            )
            outs = []
            for _ in range(case.get("calls", 1)):
                with torch.no_grad():
                    outs.append(latents(pipe(**call_kwargs(case, rank))))
            results.append(("ok", outs, pp.bytes_per_step(), pp.captures, pp.exchange.puts))
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results.append(("error", type(err).__name__, str(err)))
        finally:
            if pp is not None:
                pp.remove()
            restore_env()
    return results


def simulated(case: dict, patches: int) -> torch.Tensor:
    from asyncdiff_rt import simulate

    pipe = pipe_of(case["kind"], case.get("device", "cpu"), case.get("dtype"))
    torch.set_num_threads(1)
    with torch.no_grad():
        out = simulate(
            pipe, strategy="patch", patches=patches, warm_up=case.get("warm_up", 2),
            sync_mode=case.get("sync_mode", "corrected_async_gn"), **call_kwargs(case),
        )  # fmt: skip
    return latents(out)


def plain(case: dict) -> torch.Tensor:
    pipe = pipe_of(case["kind"], case.get("device", "cpu"), case.get("dtype"))
    torch.set_num_threads(1)
    with torch.no_grad():
        return latents(pipe(**call_kwargs(case)))


def graph_path_keys(rank: int, world: int, modes: list[str]) -> list:
    """The graph path of PatchParallel on the CPU (graphs.py): `Executor.run` runs eagerly here but records its
    graph keys and argument signatures. Per mode: (eager latents, graph-path latents, keys, signatures)."""
    torch.set_num_threads(1)
    from asyncdiff_rt import PatchParallel
    from asyncdiff_rt.runtime import executor

    seen: list = []

    def run(self, fn, key, args, kwargs, side):
        seen.append((key, executor.signature_of((args, kwargs))))
        return fn(*args, **kwargs), side

    executor.Executor.run = run
    results = []
    for mode in modes:
        case = dict(kind="sd15", size=128, sync_mode=mode, steps=4, warm_up=2)
        outs, seen[:] = [], []
        for graph_path in (False, True):
            pipe = pipe_of("sd15")
            pp = PatchParallel(pipe, warm_up=2, sync_mode=mode, transport="gloo")
            if graph_path:  # as on CUDA (graphs.py), with the executor above
                pp.graphs.enabled = pp.graphs.executor.use_graphs = True
            with torch.no_grad():
                outs.append(latents(pipe(**call_kwargs(case, rank))))
            pp.remove()
        results.append((outs[0], outs[1], [k for k, _ in seen], len({s for _, s in seen})))
    return results


def deferred_wait_order(rank: int, world: int, modes: list[str]) -> list:
    """The graph path on the CPU with the overlap paths on (graphs.OVERLAP_ENV): per mode, the events
    ("await", step, K/V group) of `PatchExchange.await_deferred` and ("forward", step, comm_inside) of
    `PatchGraphs.run`, in order (Note [deferred K/V] in exchange.py)."""
    import os

    torch.set_num_threads(1)
    from asyncdiff_rt import PatchParallel
    from asyncdiff_rt.strategies.patches import exchange, graphs

    os.environ[graphs.OVERLAP_ENV] = "1"
    events: list = []
    await_deferred, run = exchange.PatchExchange.await_deferred, graphs.PatchGraphs.run

    def recorded_await(self, group=-1):
        events.append(("await", self.policy.step, group))
        return await_deferred(self, group)

    def recorded_run(self, fn, key, args, kwargs, comm_inside, prepare=None):
        events.append(("forward", pp.exchange.policy.step, comm_inside))
        return run(self, fn, key, args, kwargs, comm_inside, prepare)

    exchange.PatchExchange.await_deferred, graphs.PatchGraphs.run = recorded_await, recorded_run
    results = []
    for mode in modes:
        case = dict(kind="sd15", size=128, sync_mode=mode, steps=4, warm_up=2)
        pipe = pipe_of("sd15")
        pp = PatchParallel(pipe, warm_up=2, sync_mode=mode, transport="gloo")
        pp.graphs.enabled = pp.graphs.executor.use_graphs = True  # as on CUDA (graphs.py)
        events.clear()
        with torch.no_grad():
            pipe(**call_kwargs(case, rank))
        results.append(list(events))  # the call's (`remove` waits for the last K/V too, after it)
        pp.remove()
    return results


def kv_write_order(rank: int, world: int, mode: str, groups: int) -> tuple[list, list, int]:
    """The graph path on the CPU with the overlap paths on: the events ("await", step, K/V group) of
    `PatchExchange.await_deferred` and ("kv write", step, the point's K/V group) of every K/V projection into the
    exchange's buffer, in order; per K/V point whether both slots' K/V are the one buffer (Note [kv slots] in
    exchange.py); and the number of K/V groups (Note [K/V groups]) made of about `groups`."""
    import os

    torch.set_num_threads(1)
    from asyncdiff_rt import PatchParallel
    from asyncdiff_rt.strategies.patches import exchange, graphs, layers

    os.environ[graphs.OVERLAP_ENV] = "1"
    os.environ[exchange.KV_GROUPS_ENV] = str(groups)
    events: list = []
    await_deferred, project_into = exchange.PatchExchange.await_deferred, layers._project_into

    def recorded_await(self, group=-1):
        events.append(("await", self.policy.step, group))
        return await_deferred(self, group)

    def recorded_project(linear, x, out):
        ex = pp.exchange
        if ex.frozen:  # the registering step writes into standalone tensors
            storage = out.untyped_storage().data_ptr()
            key = next(k for k, w in ex._kv.items() if w.untyped_storage().data_ptr() == storage)
            events.append(("kv write", ex.policy.step, ex._kv_group[key]))
        return project_into(linear, x, out)

    exchange.PatchExchange.await_deferred, layers._project_into = recorded_await, recorded_project
    case = dict(kind="sd15", size=128, sync_mode=mode, steps=4, warm_up=2)
    pipe = pipe_of("sd15")
    pp = PatchParallel(pipe, warm_up=2, sync_mode=mode, transport="gloo")
    pp.graphs.enabled = pp.graphs.executor.use_graphs = True  # as on CUDA (graphs.py)
    with torch.no_grad():
        pipe(**call_kwargs(case, rank))
    ex = pp.exchange
    shared = [
        ex.mine[0][k]["kv"].data_ptr() == ex.mine[1][k]["kv"].data_ptr() == w[:, :, rank].data_ptr()
        and all(ex.theirs[s][q][k]["kv"].data_ptr() == w[:, :, q].data_ptr() for s in (0, 1) for q in ex.peers)
        for k, w in ex._kv.items()
    ]
    groups = len(set(ex._kv_group.values()))
    in_the_call = list(events)  # `remove` waits for the last K/V too (`retire`), after the call
    pp.remove()
    return in_the_call, shared, groups
