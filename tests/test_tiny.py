"""The tiny random-weight pipelines built in code: every kind builds, runs, is deterministic, and has the block
names of the real architecture; the documented ``save_pretrained`` / ``from_pretrained`` path round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncdiff_rt.tiny import KINDS, call_kwargs, denoiser_of, expected_shape, make_pipeline, output_of
from asyncdiff_rt.tiny.tokenizers import make_clip_tokenizer, make_t5_tokenizer

PIPELINE_CLASS = {
    "sd15": ("StableDiffusionPipeline", "UNet2DConditionModel"),
    "sd21": ("StableDiffusionPipeline", "UNet2DConditionModel"),
    "sdxl": ("StableDiffusionXLPipeline", "UNet2DConditionModel"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "sd35_medium": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "sd35_large": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
    "flux_schnell": ("FluxPipeline", "FluxTransformer2DModel"),
    "sdxl_inpaint": ("StableDiffusionXLInpaintPipeline", "UNet2DConditionModel"),
    "sd_upscale": ("StableDiffusionUpscalePipeline", "UNet2DConditionModel"),
    "sdxl_controlnet": ("StableDiffusionXLControlNetPipeline", "UNet2DConditionModel"),
    "svd": ("StableVideoDiffusionPipeline", "UNetSpatioTemporalConditionModel"),
    "animatediff": ("AnimateDiffPipeline", "UNetMotionModel"),
    "demo": ("StableDiffusionPipeline", "UNet2DConditionModel"),
}

FLUX_NAMES = [
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "pos_embed",
    "transformer_blocks.1",
    "single_transformer_blocks.3",
    "norm_out",
    "proj_out",
]

# Modules the runtime's plans name: they must exist with these names (as in the real checkpoints).
MUST_HAVE = {
    "sd15": ["down_blocks.0.attentions.1.transformer_blocks.0", "down_blocks.3.resnets.1", "mid_block.attentions.0"],
    "sd21": ["down_blocks.2.attentions.0.proj_in", "mid_block.resnets.1", "up_blocks.3.attentions.2"],
    "sdxl": [
        "add_embedding",
        "down_blocks.1.attentions.0.transformer_blocks.1",
        "mid_block.attentions.0.transformer_blocks.1",
        "up_blocks.0.attentions.2.transformer_blocks.2",
    ],
    "sd3": ["pos_embed", "context_embedder", "transformer_blocks.3", "proj_out"],
    "sd35_medium": ["pos_embed", "transformer_blocks.0.attn2", "transformer_blocks.3", "proj_out"],
    "sd35_large": ["pos_embed", "transformer_blocks.5.attn.norm_q", "proj_out"],
    "flux": FLUX_NAMES,
    "flux_schnell": FLUX_NAMES,
    "sdxl_inpaint": ["down_blocks.1.attentions.0.transformer_blocks.1"],
    "sd_upscale": ["class_embedding", "down_blocks.0.resnets.1", "down_blocks.3.attentions.1"],
    "sdxl_controlnet": ["down_blocks.1.attentions.0.transformer_blocks.1"],
    "svd": ["add_embedding", "down_blocks.0.attentions.0.temporal_transformer_blocks.0", "mid_block.resnets.0"],
    "animatediff": ["down_blocks.0.motion_modules.1", "mid_block.motion_modules.0", "up_blocks.3.motion_modules.2"],
    "demo": ["down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0"],
}


def _run(pipe, kind: str, **kw) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(output_of(pipe(**call_kwargs(kind, **kw))))


@pytest.mark.parametrize("kind", KINDS)
def test_kind_builds_runs_and_is_deterministic(kind):
    pipe = make_pipeline(kind, seed=0)
    assert (type(pipe).__name__, type(denoiser_of(pipe)).__name__) == PIPELINE_CLASS[kind]
    names = dict(denoiser_of(pipe).named_modules())
    missing = [n for n in MUST_HAVE[kind] if n not in names]
    assert not missing, missing

    kwargs = call_kwargs(kind)
    out = _run(pipe, kind)
    assert out.shape == expected_shape(kind, kwargs)
    assert np.isfinite(out).all()
    assert out.std() > 1e-3  # not a constant image

    again = _run(make_pipeline(kind, seed=0), kind)  # a second build from the same seed
    np.testing.assert_array_equal(out, again)


def test_seed_changes_weights():
    a = denoiser_of(make_pipeline("sd15", seed=0)).state_dict()
    b = denoiser_of(make_pipeline("sd15", seed=1)).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_structural_details():
    sdxl = denoiser_of(make_pipeline("sdxl"))
    assert sdxl.config.addition_embed_type == "text_time"
    assert len(sdxl.mid_block.attentions[0].transformer_blocks) >= 2
    sd3 = denoiser_of(make_pipeline("sd3"))
    flags = [b.context_pre_only for b in sd3.transformer_blocks]
    assert flags[-1] and not any(flags[:-1])
    up = denoiser_of(make_pipeline("sd_upscale"))
    assert up.config.in_channels == 7 and up.config.num_class_embeds is not None
    assert denoiser_of(make_pipeline("sdxl_inpaint")).config.in_channels == 9
    sd21 = make_pipeline("sd21")
    assert sd21.unet.config.use_linear_projection and sd21.scheduler.config.prediction_type == "v_prediction"
    sd15 = make_pipeline("sd15")
    assert not sd15.unet.config.use_linear_projection and sd15.scheduler.config.prediction_type == "epsilon"
    assert sd15.text_encoder.config.hidden_size == sd15.unet.config.cross_attention_dim


def test_controlnet_residuals_matter():
    pipe = make_pipeline("sdxl_controlnet")
    with torch.no_grad():
        on = np.asarray(output_of(pipe(**call_kwargs("sdxl_controlnet"))))
        off = np.asarray(output_of(pipe(**{**call_kwargs("sdxl_controlnet"), "controlnet_conditioning_scale": 0.0})))
    assert np.abs(on - off).max() > 1e-4


def test_output_type_pt():
    kw = call_kwargs("sd15", output_type="pt")
    with torch.no_grad():
        img = make_pipeline("sd15")(**kw).images
    assert isinstance(img, torch.Tensor) and img.shape == (1, 3, kw["height"], kw["width"])


def test_tokenizers_in_memory():
    prompt = "A photo of an astronaut riding a horse on Mars, 8k — café! 🚀"
    clip = make_clip_tokenizer()
    ids = clip(prompt, padding="max_length", max_length=clip.model_max_length, truncation=True).input_ids
    assert len(ids) == clip.model_max_length == 77
    assert ids[0] == clip.bos_token_id and clip.eos_token_id in ids
    assert clip.unk_token_id not in ids[1 : ids.index(clip.eos_token_id)]  # byte-level: every byte is known
    assert clip.decode(ids, skip_special_tokens=True).startswith("a photo of an astronaut riding a horse")
    t5 = make_t5_tokenizer()
    ids = t5(prompt).input_ids
    assert ids[-1] == t5.eos_token_id and len(ids) > 5
    assert t5.convert_ids_to_tokens(ids[:3]) == ["▁A", "▁photo", "▁of"]


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tiny pipeline kind"):
        make_pipeline("sd99")


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_save_pretrained_from_pretrained_roundtrip(kind, tmp_path):
    """The documented user path: from_pretrained on a local folder (here one save_pretrained wrote)."""
    import diffusers

    pipe = make_pipeline(kind, seed=0)
    ref = _run(pipe, kind)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    # Weights are bitwise equal; kernels on differently aligned (memory-mapped) weights may round differently.
    np.testing.assert_allclose(_run(loaded, kind), ref, atol=1e-5, rtol=0)
