"""The FLUX.1 branch of `asyncdiff-rt bench` and `bench --emulate` without a GPU: the real architecture's dtype, step
count and guidance (built on meta), the one-process variants' set-up on a FLUX pipeline (the transformer found,
the graph floor's wrapper exact, compile on the transformer), the whole bench on `tiny:flux` on CPU, and the
emulation's orchestration with its CFG variants skipped (FLUX.1 is guidance-distilled)."""

from __future__ import annotations

import json

import pytest
import torch

from asyncdiff_rt.tools import archs, bench, emulate
from asyncdiff_rt.tools.bench_setup import bench_pipeline, model_dtype, model_runs_cfg, model_steps


# ---------------------------------------------------------------------------------------------- per model
def test_flux_runs_bf16_28_steps_without_cfg():
    assert archs.default_dtype("flux") == archs.default_dtype("flux_schnell") == torch.bfloat16
    assert archs.default_dtype("sdxl") == torch.float16
    assert model_dtype("flux", "cuda") == model_dtype("tiny:flux", "cuda:0") == torch.bfloat16
    assert model_dtype("sd3", "cuda") == model_dtype("tiny:sd15", "cuda") == torch.float16
    assert model_dtype("tiny:flux", "cpu") == torch.float32
    assert model_steps("flux") == model_steps("tiny:flux") == 28 and model_steps("flux_schnell") == 4
    assert model_steps("sdxl") == model_steps("tiny:sdxl_inpaint") == 50
    assert not model_runs_cfg("flux") and not model_runs_cfg("tiny:flux_schnell")
    assert model_runs_cfg("sd3") and model_runs_cfg("tiny:sd15")


def test_real_flux_is_made_in_bf16_where_it_lives(monkeypatch):
    """FLUX.1-dev made in float32 first is 47.6 GB before the cast (four emulated GPUs build it at once): its
    parameters must be created in bf16 on the target device, and no text encoder exists."""
    import diffusers

    seen = {}
    real_init = diffusers.FluxTransformer2DModel.__init__

    def init(self, *a, **k):
        seen["dtype"], seen["device"] = torch.get_default_dtype(), torch.empty(0).device
        real_init(self, *a, **k)

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "__init__", init)
    pipe = archs.build_pipeline("flux", device="meta")  # dtype: the model's own
    assert seen == {"dtype": torch.bfloat16, "device": torch.device("meta")}
    assert torch.get_default_dtype() == torch.float32  # restored
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    kwargs = archs.prompt_kwargs("flux", pipe)
    assert kwargs["prompt_embeds"].dtype == torch.bfloat16 and kwargs["height"] == 1024
    assert "negative_prompt_embeds" not in kwargs and "true_cfg_scale" not in kwargs


# ---------------------------------------------------------------------------------------------- set-up
class EagerCall:
    """Stands in for CapturedCall on a CPU: the same wrapper around the denoiser, run eagerly."""

    made = 0

    def __init__(self, fn, args, kwargs):
        EagerCall.made += 1
        self.fn = fn

    def __call__(self, args, kwargs):
        return self.fn(*args, **kwargs)


def _latents(pipe, kwargs):
    with torch.no_grad():
        return bench._latents(pipe(**bench._seeded(kwargs)))


def test_setup_single_finds_the_flux_transformer(monkeypatch):
    from asyncdiff_rt.runtime import executor

    eager, kwargs = bench.setup_single("tiny:flux", "eager", 2, device="cpu")
    assert type(eager).__name__ == "FluxPipeline" and kwargs["output_type"] == "latent"
    assert kwargs["num_inference_steps"] == 2 and "negative_prompt" not in kwargs
    reference = _latents(eager, kwargs)
    assert reference.ndim == 3  # packed tokens (batch, tokens, 64)

    monkeypatch.setattr(executor, "CapturedCall", EagerCall)
    floor, kwargs = bench.setup_single("tiny:flux", "graph_floor", 2, device="cpu")
    assert "forward" in vars(floor.transformer)  # the transformer's forward is the floor's wrapper
    EagerCall.made = 0
    torch.testing.assert_close(_latents(floor, kwargs), reference, rtol=0, atol=0)
    assert EagerCall.made == 1  # one signature for every step

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: compiled.append((self, k.get("mode"))))
    pipe, _ = bench.setup_single("tiny:flux", "compile_ro", 2, device="cpu")
    assert compiled == [(pipe.transformer, "reduce-overhead")]

    ours, kwargs = bench.setup_single("tiny:flux", "ours_n1", 2, device="cpu")
    assert getattr(type(ours), "_asyncdiff_rt_hooked", False)
    torch.testing.assert_close(_latents(ours, kwargs), reference, rtol=0, atol=0)  # model_n=1 is exact


def test_decode_unpacks_flux_latents(monkeypatch):
    pipe, kwargs = bench_pipeline("tiny:flux", "cpu", 2)
    latents = _latents(pipe, kwargs)
    shapes = []
    real = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **k: shapes.append(tuple(z.shape)) or real(z, **k))
    assert bench._decode_ms(pipe, latents, kwargs) > 0
    assert shapes == [(1, 16, 8, 8)] * 2  # 64 px: 8x8 latents of 16 channels, unpacked from 16 tokens of 64


# ---------------------------------------------------------------------------------------------- the bench
def test_bench_tiny_flux_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = ["--model", "tiny:flux", "--variants", "eager,graph_floor,ours_n1", "--steps", "2", "--runs", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "latency_tiny_flux_cpu.json").read_text())
    meta, rows = data["meta"], data["variants"]
    assert (meta["size"], meta["steps"], meta["dtype"], meta["batch"], meta["cfg"]) == (64, 2, "float32", 1, False)
    assert rows["eager"]["runs"] == 1 and rows["eager"]["vae_decode_ms"] > 0 and rows["eager"]["peak_mem_gib"] is None
    assert rows["ours_n1"]["median_s"] > 0 and rows["ours_n1"]["max_abs_vs_eager"] == 0.0
    assert "needs CUDA" in rows["graph_floor"]["error"]
    md = (out / "latency_tiny_flux_cpu.md").read_text()
    assert md.startswith("# tiny:flux at 64 px, 2 steps, batch 1 (guidance-distilled: no CFG batch), float32 — cpu")
    assert "| ours_n1 |" in md and "failed: RuntimeError: graph_floor needs CUDA" in md
    # the same file with another step count is refused rather than mixed
    with pytest.raises(SystemExit, match="holds a 2-step run"):
        bench.main([*argv[:4], "--steps", "3", "--out", str(out)])


def test_bench_steps_default_to_the_model_card(monkeypatch, tmp_path):
    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run_variant", lambda model, variant, steps, runs: got.append(steps) or 1 / 0)
    bench.main(["--model", "tiny:flux", "--variants", "eager", "--out", str(tmp_path)])
    assert got == [28]
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny:nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--model", "flux", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- emulation
def test_flux_emulation_has_no_cfg_variants():
    names = [v["name"] for v in emulate.variants_for(4, cfg=False)]
    assert names == ["one", "control", "ours_n4s1w1", "ours_n4s1w3", "ours_n3s2w1"]
    assert set(emulate.cfg_skipped("flux", 2)) == {"cfg2"} and set(emulate.cfg_skipped("tiny:flux", 4)) == {"cfg2_n2"}
    assert "guidance-distilled" in emulate.cfg_skipped("flux", 2)["cfg2"]
    assert emulate.cfg_skipped("sdxl", 2) == {}


class StandIn:
    pipe_dir = "/nonexistent/stand-in"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def client_env(self, n):
        return {}

    def server_list(self):
        return ""


@pytest.mark.slow
def test_emulation_tiny_flux_on_cpu_processes(tmp_path):
    only = ["one", "ours_n2s1w1", "cfg2"]
    emulate.run_emulation("tiny:flux", 2, steps=3, runs=1, out=str(tmp_path), timeout_s=300, device="cpu",
                          daemon=StandIn(), only=only)  # fmt: skip
    data = json.loads((tmp_path / "emulated_tiny_flux_cpu.json").read_text())
    entry = data["emulations"]["2"]
    assert list(entry["variants"]) == ["one", "ours_n2s1w1"]  # cfg2 skipped, not failed
    assert set(entry["skipped"]) == {"cfg2"} and entry["size"] == 64 and entry["dtype"] == "float32"
    for r in entry["variants"].values():
        assert "error" not in r, r
    seg = entry["variants"]["ours_n2s1w1"]
    assert 1.0 < seg["s"] <= 2.0 and seg["ideal"] > 1.0
    md = (tmp_path / "emulated_tiny_flux_cpu.md").read_text()
    assert "cfg2: skipped: tiny:flux runs no classifier-free guidance" in md
    assert md.startswith("# tiny:flux at 64 px, float32, 3 steps")
