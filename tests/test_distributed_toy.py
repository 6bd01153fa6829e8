"""The runtime over gloo (one process per rank) equals the simulator on the toy denoiser."""

import pytest
import torch
from dist_cases import run_cases
from toy import ToyPipeline

from asyncdiff_rt import simulate
from asyncdiff_rt.tools.launch import spawn

CASES_2 = [
    dict(kind="toy", plan=[["A"], ["B", "C"]], steps=6),
    dict(kind="toy", plan=[["A", "B"], ["C"]], steps=7, time_shift=True, warm_up=2),
    dict(kind="toy", plan=[["A"], ["B", "C"]], steps=6, calls=2),
]
CASES_3 = [
    dict(kind="toy", plan=[["A"], ["B"], ["C"]], steps=6),
    dict(kind="toy", plan=[["A"], ["B", "C"]], stride=2, steps=7),
    dict(kind="toy", plan=[["A"], ["B", "C"]], stride=2, steps=6, stride_eps="fresh", time_shift=True),
]


def expected(case):
    pipe = ToyPipeline(case["steps"])
    return torch.tensor(
        simulate(
            pipe,
            plan=case["plan"],
            stride=case.get("stride", 1),
            warm_up=case.get("warm_up", 1),
            time_shift=case.get("time_shift", False),
            stride_eps=case.get("stride_eps", "reuse"),
        ),
        dtype=torch.float64,
    )


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (3, CASES_3)])
def test_gloo_equals_simulator(world, cases):
    results = spawn(run_cases, world, cases, timeout_s=120)
    for case, got in zip(cases, results[0]):
        assert got["status"] == "ok", got
        for out in got["outputs"]:
            torch.testing.assert_close(out, expected(case), rtol=0, atol=1e-12)


def subgroup_worker(rank: int, world: int, transport: str):
    """4 processes as 2 x model_n=2: every rank creates both groups (new_group is collective), joins its own."""
    import torch.distributed as dist

    import asyncdiff_rt

    dist.init_process_group("gloo")
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pipe = ToyPipeline(6)
    ad = asyncdiff_rt.AsyncDiff(pipe, plan=[["A"], ["B", "C"]], group=groups[rank // 2], transport=transport)
    assert ad.rank == rank % 2 and ad.world_size == 2
    out = torch.tensor(pipe(), dtype=torch.float64)
    ad.remove()
    return out


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_subgroups_run_independent_instances(transport):
    results = spawn(subgroup_worker, 4, transport, timeout_s=180)
    reference = expected(dict(plan=[["A"], ["B", "C"]], steps=6))
    for out in results:
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
