"""The tiny FLUX.1 (dev, schnell) and SD3.5 (medium, large) pipelines under plain diffusers on the CPU, how
FluxPipeline calls its transformer (what a FLUX adapter relies on), the documented ``from_pretrained`` path, and
the real FLUX.1 / SD3.5 architectures' sizes, built on the meta device (no memory)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from asyncdiff_rt.tiny import KINDS, call_kwargs, denoiser_of, expected_shape, make_pipeline, output_of
from asyncdiff_rt.tiny.flux import (
    DOUBLE_BLOCKS,
    SINGLE_BLOCKS,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    flux_true_cfg_kwargs,
)
from asyncdiff_rt.tools import archs

NEW_KINDS = ("flux", "flux_schnell", "sd35_medium", "sd35_large")
FLUX_KINDS = ("flux", "flux_schnell")
# What FluxPipeline passes its transformer, every call (all by keyword)
FLUX_CALL_KEYS = {
    "hidden_states",
    "timestep",
    "guidance",
    "pooled_projections",
    "encoder_hidden_states",
    "txt_ids",
    "img_ids",
    "joint_attention_kwargs",
    "return_dict",
}


def _run(pipe, kwargs) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(output_of(pipe(**kwargs)))


class _Calls:
    """Records the keyword arguments of every forward of a module."""

    def __init__(self, module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        assert not args, "FluxPipeline passes its transformer everything by keyword"
        self.calls.append(dict(kwargs))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kind_runs_and_is_deterministic(kind):
    assert kind in KINDS
    pipe = make_pipeline(kind, seed=0)
    kwargs = call_kwargs(kind)
    assert isinstance(kwargs["generator"], torch.Generator) and kwargs["height"] == kwargs["width"] == 64
    start = time.perf_counter()
    out = _run(pipe, kwargs)
    seconds = time.perf_counter() - start
    assert out.shape == expected_shape(kind, kwargs) == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 1e-3
    # ~0.05 s a call alone on one core; a shared CPU can slow it 50x, so the size is what is held small
    assert seconds < 30.0
    assert sum(p.numel() for p in denoiser_of(pipe).parameters()) < 500_000
    np.testing.assert_array_equal(out, _run(pipe, call_kwargs(kind)))  # same seed, same pipeline
    np.testing.assert_array_equal(out, _run(make_pipeline(kind, seed=0), call_kwargs(kind)))  # same weights
    assert not np.array_equal(out, _run(make_pipeline(kind, seed=1), call_kwargs(kind)))
    small = call_kwargs(kind, steps=2, size=32)
    assert _run(pipe, small).shape == expected_shape(kind, small) == (1, 32, 32, 3)


def test_flux_structure():
    dev, schnell = make_pipeline("flux"), make_pipeline("flux_schnell")
    for pipe, distilled in ((dev, True), (schnell, False)):
        tr = pipe.transformer
        assert tr.config.guidance_embeds is distilled
        assert type(tr.time_text_embed).__name__ == (
            "CombinedTimestepGuidanceTextProjEmbeddings" if distilled else "CombinedTimestepTextProjEmbeddings"
        )
        assert len(tr.transformer_blocks) == DOUBLE_BLOCKS and len(tr.single_transformer_blocks) == SINGLE_BLOCKS
        assert tr.config.in_channels == 4 * pipe.vae.config.latent_channels == 64
        assert sum(tr.config.axes_dims_rope) == tr.config.attention_head_dim
        assert tr.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
        assert tr.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
        assert pipe.vae.config.scaling_factor == VAE_SCALING_FACTOR and pipe.vae.config.shift_factor == VAE_SHIFT_FACTOR
        assert pipe.vae_scale_factor == 8
        assert pipe.scheduler.config.use_dynamic_shifting is distilled
    assert type(denoiser_of(dev)).__name__ == "FluxTransformer2DModel"


def test_flux_guidance_vector_matters_only_for_dev():
    for kind, matters in (("flux", True), ("flux_schnell", False)):
        pipe = make_pipeline(kind)
        a = _run(pipe, {**call_kwargs(kind), "guidance_scale": 1.0})
        b = _run(pipe, {**call_kwargs(kind), "guidance_scale": 7.0})
        assert bool(np.abs(a - b).max() > 1e-4) is matters, kind


@pytest.mark.parametrize("kind", FLUX_KINDS)
def test_how_flux_pipeline_calls_its_transformer(kind):
    """Argument names, shapes and values of the transformer calls: one per step, batch-carrying tensors first."""
    pipe = make_pipeline(kind)
    rec = _Calls(pipe.transformer)
    steps, batch = 3, 2
    kwargs = {**call_kwargs(kind, steps=steps), "num_images_per_prompt": batch}
    try:
        _run(pipe, kwargs)
    finally:
        rec.remove()
    assert len(rec.calls) == steps
    sigmas = pipe.scheduler.timesteps / 1000
    tokens = (64 // 16) ** 2  # 8x8 latents packed into 2x2 patches
    text = kwargs["max_sequence_length"]
    for i, call in enumerate(rec.calls):
        assert set(call) == FLUX_CALL_KEYS
        assert call["return_dict"] is False and call["joint_attention_kwargs"] == {}
        assert call["hidden_states"].shape == (batch, tokens, 64)
        assert call["encoder_hidden_states"].shape == (batch, text, pipe.transformer.config.joint_attention_dim)
        assert call["pooled_projections"].shape == (batch, pipe.transformer.config.pooled_projection_dim)
        # the sigma-scaled timestep (t / 1000), one per row; the transformer multiplies it back by 1000
        assert call["timestep"].shape == (batch,)
        torch.testing.assert_close(call["timestep"], sigmas[i].expand(batch))
        # rotary position ids: 2-D, shared by every row (no batch dimension)
        assert call["txt_ids"].shape == (text, 3) and not call["txt_ids"].any()
        assert call["img_ids"].shape == (tokens, 3)
        if kind == "flux":
            torch.testing.assert_close(call["guidance"], torch.full((batch,), 3.5))
        else:
            assert call["guidance"] is None


def test_flux_true_cfg_calls_the_transformer_twice_per_step():
    pipe = make_pipeline("flux")
    steps = 3
    cfg = flux_true_cfg_kwargs("flux", steps=steps)
    assert cfg["true_cfg_scale"] > 1 and cfg["negative_prompt"]
    rec = _Calls(pipe.transformer)
    try:
        guided = _run(pipe, cfg)
    finally:
        rec.remove()
    assert len(rec.calls) == 2 * steps
    for cond, uncond in zip(rec.calls[::2], rec.calls[1::2]):
        # the same latents, timestep and guidance, batch 1 each (no 2B batch): only the text inputs differ
        assert cond["hidden_states"].shape[0] == uncond["hidden_states"].shape[0] == 1
        assert torch.equal(cond["hidden_states"], uncond["hidden_states"])
        assert torch.equal(cond["timestep"], uncond["timestep"]) and torch.equal(cond["guidance"], uncond["guidance"])
        assert not torch.equal(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])
        assert not torch.equal(cond["pooled_projections"], uncond["pooled_projections"])
    plain = _run(pipe, call_kwargs("flux", steps=steps))
    assert guided.shape == plain.shape and np.abs(guided - plain).max() > 1e-3
    np.testing.assert_array_equal(guided, _run(pipe, flux_true_cfg_kwargs("flux", steps=steps)))
    assert _run(make_pipeline("flux_schnell"), flux_true_cfg_kwargs("flux_schnell", steps=2)).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="FLUX kinds"):
        flux_true_cfg_kwargs("sd3")


def test_sd35_structure():
    medium = denoiser_of(make_pipeline("sd35_medium"))
    large = denoiser_of(make_pipeline("sd35_large"))
    sd3 = denoiser_of(make_pipeline("sd3"))
    dual = [b.attn2 is not None for b in medium.transformer_blocks]
    assert dual == [True, True, False, False]
    assert not any(getattr(b, "attn2", None) is not None for b in large.transformer_blocks)
    assert len(large.transformer_blocks) > len(sd3.transformer_blocks)
    for model in (medium, large):
        assert model.config.qk_norm == "rms_norm"
        assert type(model.transformer_blocks[0].attn.norm_q).__name__ == "RMSNorm"
        assert model.transformer_blocks[-1].context_pre_only
    assert sd3.config.qk_norm is None


@pytest.mark.parametrize("kind", ["flux", "flux_schnell", "sd35_medium"])
def test_save_pretrained_from_pretrained_roundtrip(kind, tmp_path):
    """The documented user path (DESIGN §8): <Class>.from_pretrained on a folder save_pretrained wrote."""
    import diffusers

    pipe = make_pipeline(kind, seed=0)
    ref = _run(pipe, call_kwargs(kind))
    pipe.save_pretrained(tmp_path)
    cls = diffusers.FluxPipeline if kind in FLUX_KINDS else diffusers.StableDiffusion3Pipeline
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    if kind in FLUX_KINDS:
        assert loaded.transformer.config.guidance_embeds == pipe.transformer.config.guidance_embeds
    assert loaded.scheduler.config.use_dynamic_shifting == pipe.scheduler.config.use_dynamic_shifting
    # weights are bitwise equal; kernels on differently aligned (memory-mapped) weights may round differently
    np.testing.assert_allclose(_run(loaded, call_kwargs(kind)), ref, atol=1e-5, rtol=0)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_flux_architecture_sizes_on_meta():
    """FLUX.1-dev: 11.90 B parameters, a double-stream block 339.8 M, a single-stream one 141.6 M (MEASUREMENTS)."""
    dev = archs.build_architecture("flux", device="meta")
    assert type(dev).__name__ == "FluxTransformer2DModel" and next(dev.parameters()).is_meta
    assert len(dev.transformer_blocks) == 19 and len(dev.single_transformer_blocks) == 38
    assert _params(dev) / 1e9 == pytest.approx(11.90, abs=0.01)
    assert _params(dev.transformer_blocks[0]) / 1e6 == pytest.approx(339.8, abs=0.05)
    assert _params(dev.single_transformer_blocks[0]) / 1e6 == pytest.approx(141.6, abs=0.05)
    schnell = archs.build_architecture("flux_schnell", device="meta")
    assert dev.config.guidance_embeds and not schnell.config.guidance_embeds
    # schnell lacks only the guidance embedder (timestep-sized MLP: 256 -> 3072 -> 3072)
    assert _params(dev) - _params(schnell) == 256 * 3072 + 3072 + 3072 * 3072 + 3072
    assert archs.default_size("flux") == archs.default_size("flux_schnell") == 1024


def test_real_sd35_architecture_sizes_on_meta():
    medium = archs.build_architecture("sd35_medium", device="meta")
    large = archs.build_architecture("sd35_large", device="meta")
    assert len(medium.transformer_blocks) == 24 and len(large.transformer_blocks) == 38
    assert [b.attn2 is not None for b in medium.transformer_blocks] == [True] * 13 + [False] * 11
    assert _params(medium) / 1e9 == pytest.approx(2.24, abs=0.01)  # + a 0.23 B positional table (a buffer)
    assert _params(large) / 1e9 == pytest.approx(8.06, abs=0.01)


@pytest.mark.parametrize("name", ["flux", "flux_schnell", "sd35_large"])
def test_real_pipelines_and_prompt_embeddings_on_meta(name):
    pipe = archs.build_pipeline(name, dtype=torch.bfloat16, device="meta")
    kwargs = archs.prompt_kwargs(name, pipe, batch=2)
    if name in FLUX_KINDS:
        assert type(pipe).__name__ == "FluxPipeline"
        assert pipe.vae.config.shift_factor == 0.1159 and pipe.vae.config.scaling_factor == 0.3611
        assert kwargs["prompt_embeds"].shape == (2, 512, 4096) and kwargs["pooled_prompt_embeds"].shape == (2, 768)
        assert "negative_prompt_embeds" not in kwargs  # guidance-distilled: no CFG unless asked for
        cfg = archs.prompt_kwargs(name, pipe, batch=2, negative=True)
        assert cfg["negative_prompt_embeds"].shape == (2, 512, 4096) and cfg["true_cfg_scale"] > 1
    else:
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        assert kwargs["negative_pooled_prompt_embeds"].shape == (2, 2048)
    assert pipe.transformer.dtype == torch.bfloat16 and kwargs["height"] == 1024
