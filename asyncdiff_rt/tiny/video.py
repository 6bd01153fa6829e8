"""Tiny video pipelines: Stable Video Diffusion (image-to-video) and AnimateDiff (text-to-video)."""

from __future__ import annotations

from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor

from ._common import (
    NEGATIVE_PROMPT,
    PROMPT,
    autoencoder_kl,
    clip_text_model,
    clip_vision_model,
    generator,
    pil_image,
    seed_for,
)
from .sd import sd15_unet

SVD_TIME_DIM = 8
SVD_CROSS_DIM = 32


def svd_unet(seed: int) -> UNetSpatioTemporalConditionModel:
    """SVD layout: 3 x CrossAttnDownBlockSpatioTemporal + DownBlockSpatioTemporal; 3 added time ids (fps,
    motion bucket, noise augmentation). Its GroupNorms are fixed at 32 groups, so widths are multiples of 32."""
    seed_for(seed, "unet")
    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        addition_time_embed_dim=SVD_TIME_DIM,
        projection_class_embeddings_input_dim=3 * SVD_TIME_DIM,
        layers_per_block=2,
        cross_attention_dim=SVD_CROSS_DIM,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 2, 4, 4),
        num_frames=4,
    ).eval()


def make_svd(seed: int = 0) -> StableVideoDiffusionPipeline:
    unet = svd_unet(seed)
    seed_for(seed, "vae")
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        force_upcast=False,
    ).eval()
    image_encoder = clip_vision_model(seed, "image_encoder", hidden_size=32, projection_dim=SVD_CROSS_DIM)
    feature_extractor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        interpolation_type="linear",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )


def make_animatediff(seed: int = 0) -> AnimateDiffPipeline:
    """SD 1.5-shaped UNet2DConditionModel + MotionAdapter; the pipeline turns them into a UNetMotionModel."""
    unet = sd15_unet(seed)
    seed_for(seed, "motion_adapter")
    adapter = MotionAdapter(
        block_out_channels=(32, 32, 64, 64),
        motion_layers_per_block=2,
        motion_num_attention_heads=4,
        motion_norm_num_groups=32,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ).eval()
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=32, layers=2)
    vae = autoencoder_kl(seed, "vae")
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="linspace",
    )
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, motion_adapter=adapter, scheduler=scheduler
    )
    pipe.unet.eval()
    return pipe


def svd_kwargs(steps, seed, device, output_type, size=64, num_frames=3):
    return dict(
        image=pil_image(seed, size, size),
        height=size,
        width=size,
        num_frames=num_frames,
        num_inference_steps=steps,
        min_guidance_scale=1.0,
        max_guidance_scale=3.0,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        decode_chunk_size=2,
        generator=generator(seed, device),
        output_type=output_type,
    )


def animatediff_kwargs(steps, seed, device, output_type, size=64, num_frames=3):
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=size,
        width=size,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=generator(seed, device),
        output_type=output_type,
    )
