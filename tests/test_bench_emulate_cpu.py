"""`bench --emulate N` without a GPU: the variant list, the ideal / efficiency arithmetic, the per-round breakdown
of a synthetic timeline, the markdown of a synthetic result, the MPS daemon's errors and its stop on every exit
path (subprocess mocked), and the whole orchestration on CPU processes with tiny pipelines (a stand-in daemon)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from asyncdiff_rt.tools import bench, emulate, mps
from asyncdiff_rt.tools.bench_report import failure_cell
from asyncdiff_rt.tools.emulate_report import breakdown, ideal, label, markdown, summarize
from asyncdiff_rt.tools.mps import MpsDaemon, MpsError

TITLE_2 = "emulated: 2 processes on one GPU under MPS at 50 % of the SMs each"


# ---------------------------------------------------------------------------------------------- variants
def names(n):
    return [(v["name"], v["procs"]) for v in emulate.variants_for(n)]


def test_variants_per_n():
    assert names(2) == [("one", 1), ("control", 2), ("ours_n2s1w1", 2), ("ours_n2s1w3", 2), ("cfg2", 2)]
    assert names(3) == [("one", 1), ("control", 3), ("ours_n3s1w1", 3), ("ours_n3s1w3", 3), ("ours_n2s2w1", 3)]
    assert names(4) == [
        ("one", 1),
        ("control", 4),
        ("ours_n4s1w1", 4),
        ("ours_n4s1w3", 4),
        ("ours_n3s2w1", 4),
        ("cfg2_n2", 4),
    ]
    v = {s["name"]: s for s in emulate.variants_for(4)}
    assert v["cfg2_n2"]["model_n"] == 2 and v["cfg2_n2"]["cfg_parallel"] and not v["cfg2_n2"]["independent"]
    assert v["ours_n3s2w1"]["stride"] == 2 and v["ours_n3s2w1"]["model_n"] == 3
    assert v["ours_n4s1w3"]["warm_up"] == 3
    assert v["one"]["independent"] and v["control"]["independent"]
    cfg2 = {s["name"]: s for s in emulate.variants_for(2)}["cfg2"]
    assert cfg2["model_n"] == 1 and cfg2["cfg_parallel"] and cfg2["procs"] == 2
    for bad in (1, 5, "2", True):
        with pytest.raises(ValueError):
            emulate.variants_for(bad)


def test_percentages_and_client_env():
    assert [mps.percentage(n) for n in (1, 2, 3, 4)] == [100, 50, 33, 25]
    d = MpsDaemon()
    with pytest.raises(MpsError, match="not running"):
        d.client_env(2)
    d.running, d.pipe_dir, d.log_dir = True, "/p", "/l"
    assert d.client_env(4) == {
        "CUDA_MPS_PIPE_DIRECTORY": "/p",
        "CUDA_MPS_LOG_DIRECTORY": "/l",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
    }


def test_result_stem_sanitised():
    stem = emulate.result_stem("out", "tiny:sd15", "NVIDIA H200")
    assert stem == os.path.join("out", "emulated_tiny_sd15_NVIDIA_H200")


# ---------------------------------------------------------------------------------------------- arithmetic
def test_ideal():
    assert ideal(50, 1, 2.0) == pytest.approx(50 / (1 + 49 / 2))
    assert ideal(50, 3, 1.9) == pytest.approx(50 / (3 + 47 / 1.9))
    assert ideal(50, 1, 1.0, cfg=True) == pytest.approx(2.0)
    assert ideal(50, 1, 1.95, cfg=True) == pytest.approx(2 * 50 / (1 + 49 / 1.95))
    assert ideal(50, 1, 2.0, stride=2) == pytest.approx(50 / (1 + 49 / 4))  # a round covers two steps
    assert ideal(2, 3, 2.0) == pytest.approx(1.0)  # warm-up >= steps: exact


def synthetic(n=2, steps=50):
    def row(what, model_n, median, procs, stride=1, warm_up=1, cfg=False, s=None, **extra):
        return dict(what=what, model_n=model_n, stride=stride, warm_up=warm_up, cfg_parallel=cfg, procs=procs,
                    median_s=median, min_s=median - 0.01, max_s=median + 0.01, first_call_s=9.0,
                    times_s=[median] * 3, split_quality=s, peak_mem_gib=5.0, **extra)  # fmt: skip

    part = {"rounds": 48, "wall_ms": 48.0, "compute_ms": 43.0, "exchange_ms": 2.5, "eps_ms": 2.5, "gap_ms": 0.0}
    variants = {
        "one": row("alone", 1, 3.6, 1, breakdown={"rank 0": part}),
        "control": row("side by side", 1, 4.2, 2, medians_s=[4.2, 4.26], mean_s=4.23),
        "ours_n2s1w1": row("seg", 2, 2.5, 2, s=1.96, breakdown={"rank 0": part, "rank 1": part}),
        "ours_n2s1w3": row("seg w3", 2, 2.6, 2, warm_up=3, s=None),
        "cfg2": row("cfg", 1, 2.2, 2, cfg=True),
        "broken": {"error": "WorkerError: rank 1 died", "what": "x"},
    }
    return {
        "meta": {"model": "sdxl", "device": "NVIDIA H200", "torch": "2.11", "diffusers": "0.42.1"},
        "emulations": {
            str(n): {
                "n": n,
                "percent": 100 // n,
                "steps": steps,
                "runs": 3,
                "date": "2026-12-01",
                "size": 1024,
                "variants": variants,
            }  # fmt: skip
        },
    }


def test_summarize_speedups_ideal_efficiency():
    rows = summarize(synthetic())["emulations"]["2"]["variants"]
    seg = rows["ours_n2s1w1"]
    assert seg["vs_one"] == pytest.approx(3.6 / 2.5)
    assert seg["vs_control"] == pytest.approx(4.23 / 2.5)
    assert seg["s"] == 1.96
    assert seg["ideal"] == pytest.approx(50 / (1 + 49 / 1.96))
    assert seg["efficiency"] == pytest.approx(seg["vs_control"] / seg["ideal"])
    assert rows["cfg2"]["s"] == 1.0 and rows["cfg2"]["ideal"] == pytest.approx(2.0)
    assert rows["cfg2"]["efficiency"] == pytest.approx(4.23 / 2.2 / 2.0)
    assert rows["ours_n2s1w3"]["s"] == 2.0 and "model_n" in rows["ours_n2s1w3"]["s_note"]  # no costs: s = n
    assert rows["control"]["vs_one"] == pytest.approx(3.6 / 4.23)  # the control row is its mean
    assert rows["one"]["ideal"] is None and rows["control"]["efficiency"] is None
    assert "vs_one" not in rows["broken"]
    assert rows["one"]["label"] == label("one", 1, 50)


def span(kind, step, t0, t1, lane="compute"):
    return {"kind": kind, "step": step, "lane": lane, "start_ms": t0, "end_ms": t1}


def test_breakdown_from_synthetic_timeline():
    spans = [span("warm-up", 0, 0, 100), span("ε", 0, 100, 101, "comm")]
    # rounds 1..3: compute 40, exchange 3, ε 2, then a host gap of 5 before the next round (wall 50)
    for i, k in enumerate((1, 2, 3)):
        t = 101 + 50 * i
        spans += [span("compute", k, t, t + 40), span("exchange", k, t + 40, t + 43, "comm")]
        spans += [span("ε", k, t + 43, t + 45, "comm")]
    b = breakdown(spans)
    assert b["rounds"] == 2  # the last round has no next one to end its wall time
    assert b["wall_ms"] == pytest.approx(50)
    assert b["compute_ms"] == pytest.approx(40)
    assert b["exchange_ms"] == pytest.approx(3)
    assert b["eps_ms"] == pytest.approx(2)
    assert b["gap_ms"] == pytest.approx(5)
    one_round = breakdown(spans[:5])
    assert one_round["rounds"] == 1 and one_round["wall_ms"] == pytest.approx(45)
    assert one_round["gap_ms"] == pytest.approx(0)
    assert breakdown(spans[:2]) is None  # warm-up only: no asynchronous round
    assert breakdown([]) is None


def test_breakdown_stride2_rounds_skip_reuse_steps():
    spans = [span("warm-up", 0, 0, 10)]
    for i, k in enumerate((1, 3, 5)):  # rounds at k = 1, 3, 5 (k + 1 reuses ε)
        t = 10 + 30 * i
        spans += [span("compute", k, t, t + 25), span("exchange", k, t + 25, t + 27, "comm")]
    b = breakdown(spans)
    assert b["rounds"] == 2 and b["wall_ms"] == pytest.approx(30) and b["gap_ms"] == pytest.approx(3)


def test_markdown_from_synthetic_result():
    md = markdown(summarize(synthetic()))
    lines = md.splitlines()
    assert lines[0].startswith("# sdxl at 1024 px, 50 steps — " + TITLE_2) and "NVIDIA H200" in lines[0]
    rows = [x for x in lines if x.startswith("| ") and not x.startswith("| variant")]
    assert len(rows) == 6
    for r in rows:
        assert "(emulated: " in r and "on one GPU under MPS at 50 % of the SMs each)" in r
    assert any(r.startswith("| one (emulated: 1 process on one GPU") for r in rows)
    seg = next(r for r in rows if r.startswith("| ours_n2s1w1"))
    assert TITLE_2 in seg and "| 1.44x | 1.69x | 1.96 | 1.92x | 0.88 |" in seg
    assert "48.0 / 43.0 / 2.5 / 2.5 / 0.0 | 48.0 / 43.0 / 2.5 / 2.5 / 0.0 |" in seg
    assert "| 4.230 |" in next(r for r in rows if r.startswith("| control"))
    assert "failed: WorkerError: rank 1 died" in md
    assert "each process's median 4.200, 4.260 s; mean 4.230 s" in md
    assert "ours_n2s1w3: the plan has no segment costs" in md


def test_cfg_ceiling_and_per_rank_balance_notes():
    data = synthetic()
    rows = data["emulations"]["2"]["variants"]
    whole = {"rounds": 48, "wall_ms": 86.1, "compute_ms": 86.0, "exchange_ms": 0.0, "eps_ms": 0.0, "gap_ms": 0.1}
    half = {**whole, "wall_ms": 50.7, "compute_ms": 50.0}
    rows["control"]["breakdown"] = {"rank 0": whole}
    rows["cfg2"]["breakdown"] = {"rank 0": half, "rank 1": half}
    ranks = {f"rank {i}": {**whole, "compute_ms": c} for i, c in enumerate((45.1, 42.0, 41.5, 40.7))}
    rows["ours_n4"] = {**rows["ours_n2s1w1"], "model_n": 4, "procs": 4, "breakdown": ranks,
                       "segment_ms": [10.0, 10.5, 10.2, None]}  # fmt: skip
    halves = {f"rank {i}": {**whole, "compute_ms": c} for i, c in enumerate((47.3, 46.5, 48.0, 46.5))}
    rows["cfg2_n2"] = {**rows["ours_n4"], "cfg_parallel": True, "model_n": 2, "split_quality": 2.0, "breakdown": halves}
    summarize(data)
    n2 = rows["cfg2_n2"]["cfg_ceiling"]
    assert n2["half_ms"] == 48.0 and n2["gain"] == pytest.approx(86.0 / (2.0 * 48.0))  # the slowest rank
    assert n2["bound"] == pytest.approx(n2["gain"] * rows["cfg2_n2"]["ideal"] / 2)
    assert rows["cfg2"]["cfg_ceiling"]["gain"] == pytest.approx(86.0 / 50.0)
    assert rows["cfg2"]["cfg_ceiling"]["bound"] == pytest.approx(86.0 / 50.0)  # model_n=1: ideal / 2 = 1
    assert rows["ours_n2s1w1"]["cfg_ceiling"] is None  # not a CFG split
    md = markdown(data)
    assert "cfg2: each rank computes its part of one guidance half in 50.0 ms per step, the control's whole batch " \
           f"takes 86.0 ms: the batch split gains {86 / 50:.2f}x here, not 2; bound {86 / 50:.2f}x over the " \
           f"control; measured {4.23 / 2.2:.2f}x = {4.23 / 2.2 / (86 / 50):.2f} of it." in md  # fmt: skip
    assert "ours_n4: compute per round by rank 45.1 / 42.0 / 41.5 / 40.7 ms; the plan's segment costs " \
           "10.0 / 10.5 / 10.2 / – ms." in md  # fmt: skip
    assert "ours_n2s1w1: compute per round" not in md  # two ranks: both are in the table already


# ---------------------------------------------------------------------------------------------- the MPS daemon
def test_missing_control_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: nvidia-cuda-mps-control is not found
    with pytest.raises(MpsError, match="(?s)nvidia-cuda-mps-control is not on the PATH.*add their folder to PATH"):
        MpsDaemon().start()
    monkeypatch.setattr(emulate.torch.cuda, "is_available", lambda: pytest.fail("the parent asked CUDA"))
    with pytest.raises(SystemExit, match="bench --emulate: .*not on the PATH"):
        bench.main(["--model", "tiny:sd15", "--emulate", "2", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


class FakeControl:
    """Stands in for subprocess.run of nvidia-cuda-mps-control: `-d` creates the pipe (unless told not to)."""

    def __init__(self, start_rc=0, make_pipe=True):
        self.calls, self.start_rc, self.make_pipe = [], start_rc, make_pipe

    def __call__(self, cmd, input=None, env=None, **kw):
        self.calls.append((tuple(cmd[1:]), input, env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]))
        if cmd[1:] == ["-d"] and self.start_rc == 0 and self.make_pipe:
            open(os.path.join(env["CUDA_MPS_PIPE_DIRECTORY"], "control"), "w").close()
        rc = self.start_rc if cmd[1:] == ["-d"] else 0
        return subprocess.CompletedProcess(cmd, rc, stdout="", stderr="boom" if rc else "")

    def quits(self):
        return [c for c in self.calls if c[1] == "quit\n"]


@pytest.fixture
def control(monkeypatch):
    fake = FakeControl()
    monkeypatch.setattr(mps.shutil, "which", lambda name: "/fake/" + name)
    monkeypatch.setattr(mps.subprocess, "run", fake)
    return fake


def test_daemon_start_env_and_stop(control):
    with MpsDaemon() as d:
        root, pipe = d.root, d.pipe_dir
        assert control.calls[0][0] == ("-d",) and control.calls[0][2] == pipe and os.path.isdir(pipe)
        assert pipe.startswith(root) and d.log_dir.startswith(root) and pipe != d.log_dir
        assert d.client_env(2)["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert len(control.quits()) == 1 and control.quits()[0][2] == pipe  # quit with the same pipe folder
    assert not os.path.exists(root) and not d.running
    d.stop()  # idempotent
    assert len(control.quits()) == 1


def test_daemon_stops_on_an_exception(control):
    with pytest.raises(ValueError, match="inside"):
        with MpsDaemon() as d:
            raise ValueError("inside")
    assert len(control.quits()) == 1 and not os.path.exists(d.pipe_dir)


def test_daemon_stops_on_sigterm_and_restores_the_handler(control):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(BaseException, match="signal"):
        with MpsDaemon():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                pass
    assert len(control.quits()) == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_daemon_failures_are_clear(monkeypatch):
    monkeypatch.setattr(mps.shutil, "which", lambda name: "/fake/" + name)
    fake = FakeControl(start_rc=1)
    monkeypatch.setattr(mps.subprocess, "run", fake)
    d = MpsDaemon()
    with pytest.raises(MpsError, match=r"(?s)nvidia-cuda-mps-control -d` failed \(exit 1\): boom.*no other MPS daemon"):
        d.start()
    assert not fake.quits() and not os.path.exists(d.root or d.pipe_dir)
    fake = FakeControl(make_pipe=False)
    monkeypatch.setattr(mps.subprocess, "run", fake)
    d = MpsDaemon(start_timeout_s=0.3)
    with pytest.raises(MpsError, match="did not create its pipe"):
        d.start()
    assert len(fake.quits()) == 1 and not os.path.exists(d.pipe_dir)


def test_run_emulation_stops_the_daemon_on_ctrl_c_and_never_touches_cuda(control, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(emulate, "_spawn", interrupted)
    for name in ("is_available", "device_count", "init", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("the parent process touched CUDA"))
    d = MpsDaemon()
    with pytest.raises(KeyboardInterrupt):
        emulate.run_emulation("sdxl", 2, out=str(tmp_path), daemon=d)
    assert len(control.quits()) == 1 and not os.path.exists(d.pipe_dir)


def test_bench_main_emulate_branch(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(emulate, "run_emulation", lambda *a, **k: got.update(args=a, kwargs=k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("the parent asked CUDA"))
    assert bench.main(["--model", "sd21", "--emulate", "4", "--out", str(tmp_path)]) == 0
    assert got["args"] == ("sd21", 4, 50, 3, str(tmp_path))
    assert bench.main(["--model", "tiny:sd15", "--emulate", "2", "--steps", "2", "--runs", "1"]) == 0
    assert got["args"][:4] == ("tiny:sd15", 2, 2, 1)
    with pytest.raises(SystemExit):
        bench.main(["--model", "nope", "--emulate", "2"])
    with pytest.raises(ValueError, match="tiny kinds are tiny:sd15"):  # checked in the first child
        emulate._device_info(0, 1, {"device": "cpu", "model": "tiny:nope"})
    assert emulate._device_info(0, 1, {"device": "cpu", "model": "tiny:sd15"})["device"] == "cpu"
    with pytest.raises(SystemExit):
        bench.main(["--model", "sdxl", "--emulate", "5"])


# ---------------------------------------------------------------------------------------------- orchestration
class StandIn:
    """What run_emulation needs of a daemon, on CPU (no MPS): the clients' environment is empty."""

    pipe_dir = "/nonexistent/stand-in"

    def __init__(self):
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        self.exited += 1

    def client_env(self, n):
        return {}

    def server_list(self):
        return ""


@pytest.mark.slow
def test_orchestration_on_cpu_processes(tmp_path):
    daemon = StandIn()
    only = ["one", "control", "ours_n2s1w1"]
    emulate.run_emulation("tiny:sd15", 2, steps=3, runs=2, out=str(tmp_path), timeout_s=300, device="cpu",
                          daemon=daemon, only=only)  # fmt: skip
    assert daemon.entered == daemon.exited == 1
    data = json.loads((tmp_path / "emulated_tiny_sd15_cpu.json").read_text())
    entry = data["emulations"]["2"]
    assert data["meta"]["model"] == "tiny:sd15" and {"device", "torch", "diffusers"} <= set(data["meta"])
    assert entry["percent"] == 50 and entry["steps"] == 3 and entry["runs"] == 2 and entry["size"] == 64
    assert list(entry["variants"]) == only
    for name, r in entry["variants"].items():
        assert "error" not in r, r
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["label"] == label(name, r["procs"], 50)
    control = entry["variants"]["control"]
    assert len(control["medians_s"]) == 2 and control["mean_s"] > 0
    seg = entry["variants"]["ours_n2s1w1"]
    assert 1.0 < seg["s"] <= 2.0 and seg["ideal"] == pytest.approx(ideal(3, 1, seg["s"]))
    assert seg["efficiency"] == pytest.approx(seg["vs_control"] / seg["ideal"])
    b = seg["breakdown"]
    assert set(b) == {"rank 0", "rank 1"} and b["rank 0"]["rounds"] >= 1 and b["rank 1"]["exchange_ms"] >= 0
    md = (tmp_path / "emulated_tiny_sd15_cpu.md").read_text()
    assert TITLE_2 in md and md.count("(emulated: ") == 3
    # a second run of another n merges into the same file
    emulate.run_emulation("tiny:sd15", 3, steps=2, runs=1, out=str(tmp_path), device="cpu", daemon=StandIn(),
                          only=["one"])  # fmt: skip
    data = json.loads((tmp_path / "emulated_tiny_sd15_cpu.json").read_text())
    assert set(data["emulations"]) == {"2", "3"}


FAKE_CONTROL = """#!/bin/bash
# a stand-in nvidia-cuda-mps-control: -d leaves a background "server" with our environment; quit ends it
if [ "$1" = "-d" ]; then
  (exec -a nvidia-cuda-mps-server-fake sleep 300) </dev/null >/dev/null 2>&1 &
  echo $! > "$CUDA_MPS_LOG_DIRECTORY/pid"
  touch "$CUDA_MPS_PIPE_DIRECTORY/control"
  exit 0
fi
read -r line
case "$line" in
  quit) [ -n "$IGNORE_QUIT" ] || kill "$(cat "$CUDA_MPS_LOG_DIRECTORY/pid")" ;;
  get_server_list) echo 4242 ;;
esac
"""


def _alive(pid: int) -> bool:
    """Running (a zombie no one reaps in a container counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("ignore_quit", [False, True])
def test_daemon_with_a_stand_in_binary(tmp_path, monkeypatch, ignore_quit):
    exe = tmp_path / "nvidia-cuda-mps-control"
    exe.write_text(FAKE_CONTROL)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    if ignore_quit:  # a daemon that does not quit: stop() ends the processes with our pipe folder itself
        monkeypatch.setenv("IGNORE_QUIT", "1")
    d = MpsDaemon(stop_timeout_s=1.0)
    with pytest.raises(RuntimeError, match="inside"):
        with d:
            (server,) = mps.mps_processes(d.pipe_dir)
            assert server in mps.mps_processes(None)
            assert d.server_list() == "4242"
            raise RuntimeError("inside")
    assert mps.mps_processes(d.pipe_dir) == []
    assert not _alive(server)
    assert not os.path.exists(d.pipe_dir)


def _sleep(rank, world, seconds):
    import time

    time.sleep(seconds)


def test_spawn_terminates_its_workers_on_ctrl_c(monkeypatch):
    """Ctrl-C (or SIGTERM turned into an exception) while spawn waits: no worker is left (the MPS daemon's quit
    would wait for its clients)."""
    import multiprocessing.context as mpc

    from asyncdiff_rt.tools.launch import spawn

    started, real_start, real_join = [], mpc.SpawnProcess.start, mpc.SpawnProcess.join
    state = {"interrupted": False}

    def start(self):
        started.append(self)
        real_start(self)

    def join(self, timeout=None):
        if not state["interrupted"]:
            state["interrupted"] = True
            raise KeyboardInterrupt
        return real_join(self, timeout)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    monkeypatch.setattr(mpc.SpawnProcess, "join", join)
    with pytest.raises(KeyboardInterrupt):
        spawn(_sleep, 2, 120, timeout_s=200)
    assert len(started) == 2 and not any(p.is_alive() for p in started)


def test_failure_cell_is_one_line_that_reaches_the_cause():
    err = ("WorkerError: 4 of 4 worker(s) failed:\n--- rank 0: TransportError: ipc set-up of channel c_0to3_g2 | "
           + "x" * 200 + " CUDA error cudaErrorMemoryAllocation (out of memory)\n--- rank 1: peer exited")  # fmt: skip
    cell = failure_cell(err)
    assert "\n" not in cell and "|" not in cell  # a table row stays one row of its columns
    assert cell.startswith("WorkerError: 4 of 4 worker(s) failed: --- rank 0:") and "(out of memory)" in cell
    assert len(failure_cell("e" * 1000)) == 400
