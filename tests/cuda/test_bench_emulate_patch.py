"""`asyncdiff-rt bench --emulate 2 --strategy patch` on one GPU with tiny SDXL at 64 px (8 latent rows = 2 x 2^2)
and 4 steps at warm_up=1: the MPS daemon of its own starts, every variant (one, control, PatchParallel in every sync
mode) runs as MPS clients, the result files hold speed-ups, per-step times, bytes and PSNR, and no MPS process with
our pipe folder is left afterwards. Fresh interpreter, as tests/cuda/test_bench_emulate.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from asyncdiff_rt.tools.emulate_patch import patch_variants
from asyncdiff_rt.tools.mps import mps_processes

pytestmark = pytest.mark.cuda


def _mps_pids() -> set[int]:
    return set(mps_processes(None))  # every MPS process, whatever its pipe folder


def test_bench_emulate_patch_2_tiny(tmp_path):
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.fail("nvidia-cuda-mps-control is not on the PATH of this GPU machine")
    before = _mps_pids()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "asyncdiff_rt", "bench", "--model", "tiny:sdxl", "--emulate", "2", "--strategy",
           "patch", "--size", "64", "--steps", "4", "--runs", "1", "--warm_up", "1", "--out", str(tmp_path),
           "--emulate_timeout", "180"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=540)
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("emulated_patch_tiny_sdxl_64_"), files
    with open(os.path.join(tmp_path, files[0])) as f:
        data = json.load(f)
    entry = data["emulations"]["2"]
    assert entry["steps"] == 4 and entry["warm_up"] == 1 and entry["size"] == 64
    assert list(entry["variants"]) == [v["name"] for v in patch_variants(2, 1)]
    for name, row in entry["variants"].items():
        assert "error" not in row, (name, row.get("error"))
        assert row["median_s"] > 0 and row["step_ms"] > 0 and row["vs_control"] > 0, (name, row)
        assert "under MPS at 50 % of the SMs each" in row["label"]
    assert math.isinf(entry["variants"]["one"]["fidelity"]["psnr_db"])  # itself
    full = entry["variants"]["patch_full_sync"]
    assert full["fidelity"]["psnr_db"] > 30, full["fidelity"]  # exact up to fp16 rounding of other kernels
    corrected = entry["variants"]["patch_corrected_async_gn"]
    assert corrected["sent_bytes"] > 0 and 0 < corrected["vs_distrifusion"] < 1
    assert entry["variants"]["patch_no_sync"]["sent_split"]["kv"] == 0
    assert entry["distrifusion_bytes"] > 0 and entry["checks"]["corrected_step_over_no_sync"] > 0
    with open(os.path.join(tmp_path, files[1])) as f:
        assert "PatchParallel — emulated: 2 processes on one GPU under MPS" in f.read().splitlines()[0]

    pipe = entry["mps_pipe_dir"]
    assert pipe and not os.path.exists(pipe) and mps_processes(pipe) == []
    for _ in range(50):
        if _mps_pids() <= before:
            break
        time.sleep(0.2)
    assert _mps_pids() <= before, f"MPS processes left behind: {_mps_pids() - before}"
