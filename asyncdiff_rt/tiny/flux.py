"""Tiny FLUX.1: FluxTransformer2DModel (double-stream then single-stream blocks), a CLIP text encoder (its pooled
output only), a T5 encoder, a 16-channel VAE with FLUX's shift/scale, FlowMatchEulerDiscreteScheduler.

Two flavours, as the real checkpoints: "flux" (FLUX.1-dev: guidance-distilled, ``guidance_embeds=True``, a
``guidance`` vector beside the timestep, dynamic time shifting) and "flux_schnell" (FLUX.1-schnell: no guidance
embedding, shift 1). Neither runs classifier-free guidance by default: ``flux_true_cfg_kwargs`` adds a negative
prompt and ``true_cfg_scale > 1``, under which the pipeline calls the transformer twice per step.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ._common import NEGATIVE_PROMPT, PROMPT, autoencoder_kl, clip_text_model, generator, seed_for, t5_encoder

CLIP_HIDDEN = 32  # FLUX takes CLIPTextModel's pooler_output: pooled_projection_dim
T5_DIM = 64  # joint_attention_dim
HEADS, HEAD_DIM = 2, 16
AXES_DIMS_ROPE = (4, 6, 6)  # (text/index, row, column) rotary dims; they sum to HEAD_DIM (real: 16, 56, 56 of 128)
FLUX_MAX_SEQUENCE_LENGTH = 32  # T5 tokens (real: 512 for dev, 256 for schnell)
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 4  # real: 19 and 38

# FLUX.1 VAE (black-forest-labs/FLUX.1-dev, vae/config.json): 16 latent channels, no quant convs
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159


def flux_transformer(seed: int, guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """FLUX.1 layout: patch 1 on 2x2-packed latents (in_channels 64 = 16 latent channels x 4), rotary positions."""
    seed_for(seed, "transformer")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=AXES_DIMS_ROPE,
    ).eval()


def flux_scheduler(schnell: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """The real scheduler configs: dev shifts sigmas by image size (mu from the sequence length), schnell not."""
    if schnell:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def make_flux(seed: int = 0, schnell: bool = False) -> FluxPipeline:
    transformer = flux_transformer(seed, guidance_embeds=not schnell)
    te, tok = clip_text_model(seed, "text_encoder", hidden_size=CLIP_HIDDEN, layers=2)
    te2, tok2 = t5_encoder(seed, "text_encoder_2", d_model=T5_DIM)
    vae = autoencoder_kl(
        seed,
        "vae",
        latent_channels=16,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return FluxPipeline(
        scheduler=flux_scheduler(schnell),
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def make_flux_schnell(seed: int = 0) -> FluxPipeline:
    return make_flux(seed, schnell=True)


def flux_kwargs(steps, seed, device, output_type, size=64, schnell=False):
    """One prompt, no true CFG. dev: the distilled guidance 3.5 (the pipeline's default); schnell: 0 (unused)."""
    return dict(
        prompt=PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=0.0 if schnell else 3.5,
        generator=generator(seed, device),
        output_type=output_type,
        max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH,
    )


def flux_schnell_kwargs(steps, seed, device, output_type, size=64):
    return flux_kwargs(steps, seed, device, output_type, size=size, schnell=True)


def flux_true_cfg_kwargs(
    kind: str = "flux",
    steps: int = 4,
    seed: int = 0,
    device="cpu",
    output_type: str = "np",
    size: int = 64,
    true_cfg_scale: float = 4.0,
) -> dict:
    """``call_kwargs(kind)`` plus a negative prompt and ``true_cfg_scale > 1``: real classifier-free guidance.

    The pipeline then calls the transformer twice per step (once with the prompt's embeddings, once with the
    negative prompt's, each of batch ``B``) and mixes ``neg + scale * (pos - neg)``; no batch of ``2B`` is formed.
    """
    if kind not in ("flux", "flux_schnell"):
        raise ValueError(f"true CFG kwargs are for the FLUX kinds, not {kind!r}")
    kwargs = flux_kwargs(steps, seed, device, output_type, size=size, schnell=kind == "flux_schnell")
    return {**kwargs, "negative_prompt": NEGATIVE_PROMPT, "true_cfg_scale": float(true_cfg_scale)}
