"""The FLUX.1 bench path on one GPU with the tiny FLUX (~30 s): a pre-flight for scripts/gpu_flux.sh. bf16, the
plain CUDA-graph floor and ours_n1 replay what eager computes, the packed latents decode. Runs the bench in
a fresh interpreter (the pytest process may hold a CUDA context of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda


def test_bench_tiny_flux_on_cuda(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "asyncdiff_rt", "bench", "--model", "tiny:flux", "--steps", "4", "--runs", "1",
           "--variants", "eager,graph_floor,ours_n1", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    data = json.loads((tmp_path / path).read_text())
    meta, rows = data["meta"], data["variants"]
    assert meta["dtype"] == "bfloat16" and meta["cfg"] is False and meta["steps"] == 4
    for name in ("eager", "graph_floor", "ours_n1"):
        assert "error" not in rows[name], (name, rows[name])
        assert rows[name]["peak_mem_gib"] > 0
    assert rows["eager"]["vae_decode_ms"] > 0
    for name in ("graph_floor", "ours_n1"):  # replays of eager's kernels (0 on SD models); NaN fails too
        assert rows[name]["max_abs_vs_eager"] < 1e-2, (name, rows[name]["max_abs_vs_eager"])
