"""The example scripts (examples/run_*.py) and `asyncdiff-rt generate` run as a user runs them, on the tiny
built-in pipelines (subprocesses, two at a time: 2 cores, and importing torch + diffusers dominates).

Most scripts run with --transport local (every segment in one process) and an explicit --plan (automatic planning
times every block on the CPU, which takes seconds to tens of seconds for the tiny models); one runs with the worker
processes it starts itself, one under torchrun, one plans by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pipeline_cases import PLANS

from asyncdiff_rt.tools.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
FAST = ["--steps", "4", "--warm_up", "1", "--warmup_runs", "0", "--seed", "0"]

# script -> (tiny kind whose plan it uses, extra arguments, output file name)
SCRIPTS = {
    "run_sd": ("sd15", [], "sd15.png"),
    "run_sdxl": ("sdxl", ["--time_shift"], "sdxl.png"),
    "run_sdxl_inpaint": ("sdxl_inpaint", ["--steps", "6"], "inpaint.png"),
    "run_sd_upscale": ("sd_upscale", [], "upscale.png"),
    "run_sdxl_controlnet": ("sdxl_controlnet", [], "controlnet.png"),
    "run_sd3": ("sd3", ["--prompt", "a red fox in the snow", "--guidance_scale", "4.0"], "sd3.png"),
    "run_svd": ("svd", [], "svd.gif"),
    "run_animatediff": ("animatediff", [], "animatediff.gif"),
}


def _plan_file(folder: Path, kind: str) -> str:
    path = folder / f"plan_{kind}.json"
    path.write_text(json.dumps(PLANS[kind]["default"]))
    return str(path)


def _jobs(tmp: Path) -> dict[str, list[str]]:
    jobs = {}
    for script, (kind, extra, out) in SCRIPTS.items():
        jobs[script] = [PY, str(EXAMPLES / f"{script}.py"), "--model_n", "2", *FAST, "--transport", "local",
                        "--plan", _plan_file(tmp, kind), *extra, "--out", str(tmp / out)]  # fmt: skip
    # worker processes started by the script itself (gloo), SD 2.1 layout, stride 2 (3 ranks)
    jobs["workers"] = [PY, str(EXAMPLES / "run_sd.py"), "--version", "2.1", "--model_n", "2", "--stride", "2",
                       *FAST, "--plan", _plan_file(tmp, "sd21"), "--out", str(tmp / "workers.png")]  # fmt: skip
    # torchrun: one process per rank, as in the reference's examples
    jobs["torchrun"] = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(EXAMPLES / "run_sd3.py"),
                        "--model_n", "2", *FAST, "--plan", _plan_file(tmp, "sd3"),
                        "--out", str(tmp / "torchrun.png")]  # fmt: skip
    # `asyncdiff-rt generate` on a local diffusers folder (written with save_pretrained below)
    jobs["generate"] = [PY, "-m", "asyncdiff_rt", "generate", "--model", str(tmp / "tiny_sd15"), "--model_n", "2",
                        "--warm_up", "1", "--steps", "3", "--dtype", "float32", "--transport", "local",
                        "--plan", _plan_file(tmp, "sd15"), "--out", str(tmp / "generate.png")]  # fmt: skip
    # a script's --model path: <Class>.from_pretrained on a local folder
    jobs["from_pretrained"] = [PY, str(EXAMPLES / "run_sd.py"), "--model", str(tmp / "tiny_sd15"), "--dtype", "float32",
                               "--height", "64", "--width", "64", "--model_n", "2", *FAST, "--transport", "local",
                               "--plan", _plan_file(tmp, "sd15"), "--out", str(tmp / "pretrained.png")]  # fmt: skip
    # FLUX's true CFG split over two worker processes (each computes one of the step's two transformer calls)
    jobs["flux_true_cfg"] = [PY, str(EXAMPLES / "run_flux.py"), "--model_n", "1", "--cfg_parallel", *FAST,
                             "--true_cfg_scale", "4", "--negative_prompt", "blurry", "--transport", "gloo",
                             "--out", str(tmp / "flux_true_cfg.png")]  # fmt: skip
    # no --plan: the runtime plans by itself (rank 0 measures block costs)
    jobs["auto_plan"] = [PY, str(EXAMPLES / "run_sd3.py"), "--model_n", "2", *FAST, "--transport", "local",
                         "--out", str(tmp / "auto_plan.png")]  # fmt: skip
    return jobs


def _run(cmd: list[str], cache: Path | None = None) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["ASYNCDIFF_RT_CACHE"] = str(cache)  # block costs measured afresh, not read from the user's cache
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    from asyncdiff_rt.tiny import make_pipeline

    make_pipeline("sd15", seed=0).save_pretrained(tmp / "tiny_sd15")
    jobs = _jobs(tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, cmd, tmp / "cost_cache") for name, cmd in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    return tmp, results


def _ok(results, name):
    rc, log, _ = results[name]
    assert rc == 0, f"{name} exited {rc}:\n{log[-4000:]}"
    assert "latency" in log, log[-2000:]
    return log


def _image(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_example_runs_tiny_local(runs, script):
    tmp, results = runs
    _ok(results, script)
    out = tmp / SCRIPTS[script][2]
    assert out.exists(), f"{script} wrote no {out.name}"
    if out.suffix == ".gif":
        with PIL.Image.open(out) as im:
            assert im.n_frames == 3 and im.size == (64, 64)
    else:
        arr = _image(out)
        assert arr.shape == (64, 64, 3) and arr.std() > 1.0  # the upscaler: 16 -> 64


def test_example_with_its_own_workers(runs):
    tmp, results = runs
    log = _ok(results, "workers")
    assert "3 rank(s), transport=gloo" in log
    assert _image(tmp / "workers.png").shape == (64, 64, 3)


def test_example_under_torchrun(runs):
    tmp, results = runs
    log = _ok(results, "torchrun")
    assert log.count("latency") == 1  # rank 0 reports and saves
    assert "2 rank(s), transport=gloo" in log
    assert _image(tmp / "torchrun.png").shape == (64, 64, 3)


def test_generate_command(runs):
    tmp, results = runs
    log = _ok(results, "generate")
    assert "StableDiffusionPipeline" in log
    assert _image(tmp / "generate.png").shape == (64, 64, 3)


def test_example_from_pretrained(runs):
    tmp, results = runs
    log = _ok(results, "from_pretrained")
    assert "StableDiffusionPipeline [" + str(tmp / "tiny_sd15") in log
    assert _image(tmp / "pretrained.png").shape == (64, 64, 3)


def test_example_plans_by_itself(runs):
    tmp, results = runs
    _ok(results, "auto_plan")
    assert (tmp / "auto_plan.png").exists()


# ---- in process -------------------------------------------------------------------------------------------------


def test_generate_refuses_pipelines_that_need_an_image():
    from asyncdiff_rt.tiny import make_pipeline
    from asyncdiff_rt.tools.generate import _call_kwargs

    pipe = make_pipeline("sdxl_inpaint")
    with pytest.raises(SystemExit, match="example script"):
        _call_kwargs(pipe, {"steps": 2}, pipe.device)


def test_example_needs_input_files_with_a_real_model():
    rc, log, _ = _run([PY, str(EXAMPLES / "run_sdxl_inpaint.py"), "--model", "/nonexistent", "--image", "x.png"])
    assert rc != 0 and "with --model, pass --mask" in log


def test_save_output(tmp_path):
    from types import SimpleNamespace

    from asyncdiff_rt.tools.generate import save_output

    img = PIL.Image.new("RGB", (8, 8), (255, 0, 0))
    assert save_output(SimpleNamespace(images=[img]), str(tmp_path / "a.png")) == [str(tmp_path / "a.png")]
    two = save_output(SimpleNamespace(images=[img, img]), str(tmp_path / "b.png"))
    assert [Path(p).name for p in two] == ["b_0.png", "b_1.png"]
    video = SimpleNamespace(frames=[[img, img, img]])
    assert save_output(video, str(tmp_path / "v.gif")) == [str(tmp_path / "v.gif")]
    frames = save_output(video, str(tmp_path / "f.png"))
    assert [Path(p).name for p in frames] == ["f_000.png", "f_001.png", "f_002.png"]
    assert all(Path(p).exists() for p in frames)


def test_example_flux_true_cfg_over_two_processes(runs):
    tmp, results = runs
    log = _ok(results, "flux_true_cfg")
    assert "model_n=1" in log and "cfg_parallel=True, 2 rank(s), transport=gloo" in log, log[-2000:]
    arr = _image(tmp / "flux_true_cfg.png")
    assert arr.shape == (64, 64, 3) and arr.std() > 1.0
