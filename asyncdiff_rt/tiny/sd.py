"""Tiny UNet pipelines: SD 1.5, SD 2.1, SDXL (+ inpaint, + ControlNet), SD x4 upscaler, and the demo model.

Block names and block types follow the real architectures (only the widths and depths shrink), so plans written
against ``down_blocks.i.resnets.j`` / ``...attentions.j.transformer_blocks.k`` / ``mid_block.*`` carry over.
"""

from __future__ import annotations

from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from ._common import (
    NEGATIVE_PROMPT,
    PROMPT,
    autoencoder_kl,
    clip_text_model,
    generator,
    pil_edges,
    pil_image,
    pil_mask,
    randomize_,
    seed_for,
)

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _sd_scheduler_kwargs():
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def sd15_unet(seed: int, block_out_channels=(32, 32, 64, 64), cross_attention_dim: int = 32, heads: int = 8, **kw):
    """SD 1.5 layout: 3 x CrossAttnDownBlock2D + DownBlock2D, 2 layers per block, conv (non-linear) projections."""
    seed_for(seed, "unet")
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        use_linear_projection=False,
        norm_num_groups=32,
    )
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


def make_sd15(seed: int = 0, demo: bool = False) -> StableDiffusionPipeline:
    if demo:
        # Same layout, wider and deeper text encoder: ~1-3 s for 128x128 x 8-10 steps on 2 CPU cores.
        unet = sd15_unet(seed, block_out_channels=(96, 192, 256, 256), cross_attention_dim=128, heads=8)
        te, tok = clip_text_model(seed, "text_encoder", hidden_size=128, layers=4, heads=4)
        vae = autoencoder_kl(seed, "vae", block_out_channels=(16, 32, 64, 64))
    else:
        unet = sd15_unet(seed)
        te, tok = clip_text_model(seed, "text_encoder", hidden_size=32, layers=2)
        vae = autoencoder_kl(seed, "vae")
    scheduler = PNDMScheduler(**_sd_scheduler_kwargs(), skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sd21(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.1 layout: per-level head counts, linear projections, upcast attention, v-prediction, DDIM."""
    unet = sd15_unet(seed, heads=(2, 2, 4, 4), use_linear_projection=True, upcast_attention=True)
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=32, layers=3, hidden_act="gelu")
    vae = autoencoder_kl(seed, "vae")
    scheduler = DDIMScheduler(
        **_sd_scheduler_kwargs(),
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


XL_TIME_DIM = 8
XL_PROJ_DIM = 32


def sdxl_unet(seed: int, in_channels: int = 4) -> UNet2DConditionModel:
    """SDXL layout: DownBlock2D + 2 x CrossAttnDownBlock2D, transformer depth (1, 2, 3) (real: 1, 2, 10),
    linear projections, text_time added conditions (6 time ids + pooled text embeds)."""
    seed_for(seed, "unet")
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=XL_DOWN,
        up_block_types=XL_UP,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * XL_TIME_DIM + XL_PROJ_DIM,
        norm_num_groups=32,
    ).eval()


def _sdxl_parts(seed: int, in_channels: int = 4):
    unet = sdxl_unet(seed, in_channels)
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=32, layers=3)
    te2, tok2 = clip_text_model(
        seed, "text_encoder_2", hidden_size=32, layers=3, projection_dim=XL_PROJ_DIM, hidden_act="gelu"
    )
    vae = autoencoder_kl(seed, "vae", force_upcast=False)
    scheduler = EulerDiscreteScheduler(
        **_sd_scheduler_kwargs(), timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False
    )
    return dict(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=scheduler
    )


def make_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(**_sdxl_parts(seed), add_watermarker=False)


def make_sdxl_inpaint(seed: int = 0) -> StableDiffusionXLInpaintPipeline:
    return StableDiffusionXLInpaintPipeline(
        **_sdxl_parts(seed, in_channels=9), requires_aesthetics_score=False, add_watermarker=False
    )


def make_sdxl_controlnet(seed: int = 0) -> StableDiffusionXLControlNetPipeline:
    parts = _sdxl_parts(seed)
    seed_for(seed, "controlnet")
    # The SDXL ControlNet shape: the UNet's encoder half, conditioning embedding down by the VAE factor (8).
    controlnet = ControlNetModel.from_unet(
        parts["unet"], conditioning_embedding_out_channels=(8, 16, 32, 32), load_weights_from_unet=False
    ).eval()
    # Real ControlNets start with zero convs; trained ones are not zero. Random here, so residuals matter.
    randomize_([controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block], seed, "controlnet_zero")
    return StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)


def make_sd_upscale(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """x4 upscaler layout: 7 input channels (latents + low-res image), noise level as class label
    (num_class_embeds), DownBlock2D + 3 x CrossAttnDownBlock2D, only_cross_attention on the first three levels."""
    seed_for(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=32,
        use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
        num_class_embeds=1000,
        norm_num_groups=32,
    ).eval()
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=32, layers=2, hidden_act="gelu")
    vae = autoencoder_kl(seed, "vae", block_out_channels=(8, 16, 32), scaling_factor=0.08333)
    scheduler = DDIMScheduler(
        **_sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
    )
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )


# ---- call kwargs -------------------------------------------------------------------------------------------------


def _text_kwargs(steps: int, seed: int, device, guidance_scale: float, output_type: str):
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator(seed, device),
        output_type=output_type,
    )


def sd_kwargs(steps, seed, device, output_type, size=64, guidance_scale=7.5):
    return dict(**_text_kwargs(steps, seed, device, guidance_scale, output_type), height=size, width=size)


def sdxl_inpaint_kwargs(steps, seed, device, output_type, size=64):
    kw = sd_kwargs(steps, seed, device, output_type, size, guidance_scale=5.0)
    # strength 0.75: the loop starts at scheduler.begin_index = steps - int(steps * 0.75) (img2img-like).
    kw.update(image=pil_image(seed, size, size), mask_image=pil_mask(size, size), strength=0.75)
    return kw


def sdxl_controlnet_kwargs(steps, seed, device, output_type, size=64):
    kw = sd_kwargs(steps, seed, device, output_type, size, guidance_scale=5.0)
    kw.update(image=pil_edges(seed, size, size), controlnet_conditioning_scale=0.8)
    return kw


def sd_upscale_kwargs(steps, seed, device, output_type, low_res=16):
    kw = _text_kwargs(steps, seed, device, 7.5, output_type)
    kw.update(image=pil_image(seed, low_res, low_res), noise_level=20)
    return kw


def expected_image_shape(kind: str, kwargs: dict) -> tuple[int, int]:
    if kind == "sd_upscale":
        w, h = kwargs["image"].size
        return 4 * h, 4 * w
    return kwargs["height"], kwargs["width"]
