"""`asyncdiff-rt bench --emulate 2` on one GPU with a tiny pipeline and 5 steps (so W=3 leaves asynchronous
steps to break down): the MPS daemon of its own starts,
every variant runs as MPS clients, the result files hold the expected keys, and no MPS process with our pipe folder
is left afterwards. Needs `nvidia-cuda-mps-control` on the PATH and asyncdiff_rt._C built with CUDA
(scripts/device_build.sh). Runs the bench in a fresh interpreter: the pytest process itself may hold a CUDA context.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from asyncdiff_rt.tools.emulate import variants_for
from asyncdiff_rt.tools.mps import mps_processes

pytestmark = pytest.mark.cuda

ROW_KEYS = {"median_s", "min_s", "max_s", "times_s", "first_call_s", "vs_one", "vs_control", "s", "ideal",
            "efficiency", "breakdown", "label", "procs", "model_n", "stride", "warm_up", "cfg_parallel"}  # fmt: skip
PARTS = {"rounds", "wall_ms", "compute_ms", "exchange_ms", "eps_ms", "gap_ms"}


def _mps_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"nvidia-cuda-mps" in f.read():
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_bench_emulate_2_tiny(tmp_path):
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.fail("nvidia-cuda-mps-control is not on the PATH of this GPU machine")
    before = _mps_pids()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "asyncdiff_rt", "bench", "--model", "tiny:sd15", "--emulate", "2", "--steps", "5",
           "--runs", "1", "--out", str(tmp_path), "--emulate_timeout", "180"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=540)
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("emulated_tiny_sd15_"), files
    stem = os.path.join(tmp_path, files[0][: -len(".json")])
    with open(stem + ".json") as f:
        data = json.load(f)
    meta, entry = data["meta"], data["emulations"]["2"]
    assert {"model", "device", "torch", "diffusers", "transport"} <= set(meta) and meta["model"] == "tiny:sd15"
    assert files[0] == f"emulated_tiny_sd15_{meta['device'].replace(' ', '_')}.json"
    assert entry["n"] == 2 and entry["percent"] == 50 and entry["steps"] == 5 and entry["runs"] == 1
    print("MPS servers after the first client:", entry["mps_server_list"])
    names = [v["name"] for v in variants_for(2)]
    assert list(entry["variants"]) == names
    for name, row in entry["variants"].items():
        assert "error" not in row, (name, row.get("error"))
        assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
        assert "emulated: " in row["label"] and "under MPS at 50 % of the SMs each" in row["label"]
        assert PARTS <= set(row["breakdown"]["rank 0"]), (name, row["breakdown"])
        if name not in ("one", "control"):
            assert set(row["breakdown"]) == {"rank 0", "rank 1"} and row["ideal"] > 0 and row["efficiency"] > 0
    assert len(entry["variants"]["control"]["medians_s"]) == 2
    with open(stem + ".md") as f:
        md = f.read()
    assert "emulated: 2 processes on one GPU under MPS at 50 % of the SMs each" in md.splitlines()[0]

    # the daemon was stopped: nothing with our pipe folder, no MPS process that was not there before, folder gone
    pipe = entry["mps_pipe_dir"]
    assert pipe and not os.path.exists(pipe)
    assert mps_processes(pipe) == []
    for _ in range(50):  # a server may take a moment to exit after the daemon's quit
        if _mps_pids() <= before:
            break
        time.sleep(0.2)
    assert _mps_pids() <= before, f"MPS processes left behind: {_mps_pids() - before}"
