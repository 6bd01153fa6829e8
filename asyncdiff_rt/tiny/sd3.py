"""Tiny Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT), two CLIP encoders with projection, a T5 encoder.

The SD 3.5 kinds differ from SD 3.0 in the transformer only (as the real checkpoints do): both normalise queries and
keys (``qk_norm="rms_norm"``); 3.5-medium's first blocks add a second, image-only attention (``attn2``, MMDiT-X
"dual attention"), 3.5-large is deeper.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from ._common import NEGATIVE_PROMPT, PROMPT, autoencoder_kl, clip_text_model, generator, seed_for, t5_encoder

CLIP_HIDDEN = 32
CLIP_PROJ = 32
T5_DIM = 2 * CLIP_HIDDEN  # the pipeline pads the concatenated CLIP hidden states up to T5's width
SD3_MAX_SEQUENCE_LENGTH = 32


def sd3_transformer(seed: int, num_layers: int = 4, **extra) -> SD3Transformer2DModel:
    """SD 3.0 layout (patch 2, 16 latent channels); the last of ``transformer_blocks`` is context_pre_only.

    ``extra``: further SD3Transformer2DModel options (SD 3.5: ``qk_norm``, ``dual_attention_layers``)."""
    seed_for(seed, "transformer")
    heads, head_dim = 4, 8
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * CLIP_PROJ,
        pos_embed_max_size=16,
        **extra,
    ).eval()


def make_sd3(seed: int = 0, **transformer_options) -> StableDiffusion3Pipeline:
    transformer = sd3_transformer(seed, **transformer_options)
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=CLIP_HIDDEN, layers=3, projection_dim=CLIP_PROJ)
    te2, tok2 = clip_text_model(
        seed, "text_encoder_2", hidden_size=CLIP_HIDDEN, layers=3, projection_dim=CLIP_PROJ, hidden_act="gelu"
    )
    te3, tok3 = t5_encoder(seed, "text_encoder_3", d_model=T5_DIM)
    vae = autoencoder_kl(
        seed,
        "vae",
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )


def make_sd35_medium(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-medium-shaped: RMS q/k norms, dual attention in the first half of the blocks (real: 13 of 24)."""
    return make_sd3(seed, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def make_sd35_large(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-large-shaped: RMS q/k norms, no dual attention, deeper than the SD 3.0 tiny (real: 38 blocks)."""
    return make_sd3(seed, num_layers=6, qk_norm="rms_norm")


def sd3_kwargs(steps, seed, device, output_type, size=64):
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=generator(seed, device),
        output_type=output_type,
        max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
    )
