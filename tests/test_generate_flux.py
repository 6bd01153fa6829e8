"""`asyncdiff-rt generate` on a local FLUX.1 folder (the tiny FLUX written by save_pretrained, tokenizers included,
read back offline): model_n=2 as two worker processes over gloo on a CPU, and the image it saves equals the
simulator's for the same plan and noise."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from pipeline_cases import PLANS

import asyncdiff_rt
from asyncdiff_rt.tiny import make_pipeline
from asyncdiff_rt.tools import cli
from asyncdiff_rt.tools.generate import DEFAULT_PROMPT


@pytest.mark.slow
def test_generate_on_a_saved_flux_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything comes from the folder
    folder = tmp_path / "tiny_flux"
    make_pipeline("flux", seed=0).save_pretrained(folder)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLANS["flux"]["default"]))
    out = tmp_path / "flux.png"
    argv = ["generate", "--model", str(folder), "--model_n", "2", "--warm_up", "1", "--steps", "3",
            "--height", "64", "--width", "64", "--dtype", "float32", "--transport", "gloo", "--plan", str(plan),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    with PIL.Image.open(out) as im:
        image = np.asarray(im.convert("RGB")).astype(int)
    assert image.shape == (64, 64, 3) and image.std() > 1.0

    pipe = type(make_pipeline("flux")).from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=DEFAULT_PROMPT, num_inference_steps=3, height=64, width=64, output_type="pil",
                generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip
    expected = asyncdiff_rt.simulate(pipe, plan=PLANS["flux"]["default"], stride=1, warm_up=1, **call).images[0]
    expected = np.asarray(expected.convert("RGB")).astype(int)
    assert np.abs(image - expected).max() <= 1  # one 8-bit level: the ranks' float sums may round differently
    sequential = np.asarray(pipe(**{**call, "generator": torch.Generator("cpu").manual_seed(0)}).images[0]).astype(int)
    assert np.abs(image - sequential).max() > 1  # asynchronous steps: not the sequential image
