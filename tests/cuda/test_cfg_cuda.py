"""CFG parallelism on one GPU: 2 processes (model_n=1) and 4 processes (model_n=2) sharing it over shm, equal to
plain diffusers computed per guidance half and to the segments simulator. fp32 without TF32."""

import pytest
import torch
from cfg_cases import halves_reference, run_cases, simulated

from asyncdiff_rt.tools.launch import spawn

pytestmark = pytest.mark.cuda

SDXL_N2 = [
    ["conv_in", "down_blocks.0", "down_blocks.1"],
    ["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_cfg2_on_one_gpu_over_shm(kind):
    case = dict(kind=kind, transport="shm", device="cuda")
    per_rank = spawn(run_cases, 2, [case], timeout_s=300)
    ref = halves_reference(case)
    for rank, got in enumerate(per_rank):
        assert got[0][0] == "ok", f"rank {rank}: {got[0]}"
        torch.testing.assert_close(got[0][1][0], ref, rtol=1e-4, atol=1e-4)


def test_cfg2_n2_on_one_gpu_over_shm_equals_the_simulator():
    case = dict(kind="sdxl", model_n=2, plan=SDXL_N2, steps=5, transport="shm", device="cuda")
    per_rank = spawn(run_cases, 4, [case], timeout_s=300)
    ref = simulated(case)
    for rank, got in enumerate(per_rank):
        assert got[0][0] == "ok", f"rank {rank}: {got[0]}"
        torch.testing.assert_close(got[0][1][0], ref, rtol=1e-4, atol=1e-4)
