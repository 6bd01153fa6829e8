"""The command line a new user meets: one clear line for the errors we raise on purpose (exit 2), tracebacks only
for bugs or with --debug; float32 by default on a CPU; the FLOP cost model plans SDXL in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asyncdiff_rt.errors import ConfigError
from asyncdiff_rt.tools import cli
from asyncdiff_rt.tools.launch import WorkerError

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="about running without CUDA")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("asyncdiff-rt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_demo_model_n_0_is_one_line(capsys):
    assert cli.main(["demo", "--model_n", "0"]) == 2
    assert "--model_n must be 1 or more" in _one_error_line(capsys.readouterr().err)


@no_cuda
def test_demo_nccl_on_cpu_is_one_line(capsys):
    assert cli.main(["demo", "--transport", "nccl"]) == 2
    assert "nccl needs CUDA" in _one_error_line(capsys.readouterr().err)


def test_generate_missing_folder_is_one_line(capsys):
    assert cli.main(["generate", "--model", "/nonexistent"]) == 2
    assert "no such folder: /nonexistent" in _one_error_line(capsys.readouterr().err)


def test_generate_folder_without_model_index(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in _one_error_line(capsys.readouterr().err)


def test_debug_keeps_the_traceback():
    with pytest.raises(ConfigError):
        cli.main(["demo", "--model_n", "0", "--debug"])


def _tb(kind: str, message: str) -> str:
    return f'{kind}: {message}\nTraceback (most recent call last):\n  File "x.py", line 1, in f\n{kind}: {message}\n'


def test_worker_error_of_ours_prints_the_first_rank_once(monkeypatch, capsys):
    errors = {0: _tb("ConfigError", "bad thing"), 1: _tb("ConfigError", "bad thing")}

    def fails(args):
        raise WorkerError("2 of 2 worker(s) failed", errors, [None, None])

    monkeypatch.setattr("asyncdiff_rt.tools.generate.generate", fails)
    assert cli.main(["generate", "--model", "org/name"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == "asyncdiff-rt: error: rank 0: ConfigError: bad thing (1 other rank(s) failed too)"


def test_worker_bug_shows_one_traceback(monkeypatch, capsys):
    errors = {0: "died with exit code -9", 1: _tb("AttributeError", "no x")}

    def fails(args):
        raise WorkerError("2 of 2 worker(s) failed", errors, [None, None])

    monkeypatch.setattr("asyncdiff_rt.tools.generate.generate", fails)
    assert cli.main(["generate", "--model", "org/name"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("asyncdiff-rt: error: rank 1: AttributeError: no x")  # the rank that raised, not the dead
    assert err.count("Traceback (most recent call last)") == 1


def test_unexpected_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise AttributeError("a bug")

    monkeypatch.setattr("asyncdiff_rt.tools.generate.generate", bug)
    with pytest.raises(AttributeError):
        cli.main(["generate", "--model", "org/name"])


def test_generate_defaults_to_float32_on_cpu(monkeypatch):
    from asyncdiff_rt.tools.generate import pick_dtype

    seen = {}
    monkeypatch.setattr("asyncdiff_rt.tools.generate.generate", lambda args: seen.update(vars(args)))
    assert cli.main(["generate", "--model", "org/name"]) == 0
    assert seen["dtype"] == "auto"
    assert pick_dtype(seen["dtype"], torch.device("cpu")) is torch.float32
    assert pick_dtype(seen["dtype"], torch.device("cuda")) is torch.float16


def test_demo_help_names_three_images(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sequential, asynchronous and the timeline" in out
    assert "two PNG" not in out


def test_module_entry_point_exits_2_with_one_line():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "asyncdiff_rt", "demo", "--model_n", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr)


def test_cost_model_choice():
    from asyncdiff_rt.compiler.planning import plan_for, resolve_cost_model

    assert resolve_cost_model("auto", "cpu") == "flops"
    assert resolve_cost_model("auto", "cuda") == "measured"
    assert resolve_cost_model("measured", "cpu") == "measured"
    with pytest.raises(ValueError):
        resolve_cost_model("guess", "cpu")
    import inspect

    assert inspect.signature(plan_for).parameters["cost"].default == "measured"  # the Python API keeps behaviour


@no_cuda
def test_plan_sdxl_flops_in_seconds(tmp_path, capsys):
    path = tmp_path / "plan.json"
    start = time.perf_counter()
    assert cli.main(["plan", "--model", "sdxl", "--model_n", "4", "--save", str(path)]) == 0
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert seconds < 180, seconds  # about 10 s alone on 2 cores; the timed path took over 10 minutes
    assert "cost model flops" in captured.err  # said up front
    assert "cost model: flops" in captured.out  # named with the table
    for s in ("S0", "S1", "S2", "S3"):
        assert f"\n{s} " in captured.out
    data = json.loads(path.read_text())
    assert len(data["segments"]) == 4 and all(seg["blocks"] for seg in data["segments"])
    assert data["meta"]["cost_model"] == "flops"
    assert data["meta"]["device"] == "meta"
    gflop = data["meta"]["block_gflop"]
    assert sum(gflop.values()) > 1000  # SDXL at 1024, batch 2: several TFLOPs per forward
