"""Shared builders for the tiny pipelines: seeding, text/image encoders, VAEs, inputs made in code."""

from __future__ import annotations

import contextlib
import logging
import zlib

import numpy as np
import PIL.Image
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from .tokenizers import CLIP_MAX_LENGTH, clip_vocab_size, make_clip_tokenizer, make_t5_tokenizer, t5_vocab_size

PROMPT = "a photo of an astronaut riding a horse on the moon, high quality"
NEGATIVE_PROMPT = "dark, old, small"


def seed_for(seed: int, tag: str) -> None:
    """Seed torch's global RNG from (seed, component tag): each component's weights depend on the seed only."""
    torch.manual_seed((int(seed) * 1_000_003 + zlib.crc32(tag.encode())) % (2**63 - 1))


@contextlib.contextmanager
def quiet_transformers():
    """transformers 5 logs a warning per model built from a config without weights; hush it while building."""
    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def clip_text_model(
    seed: int,
    tag: str,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int | None = None,
    hidden_act: str = "quick_gelu",
    max_length: int = CLIP_MAX_LENGTH,
):
    tok = make_clip_tokenizer(max_length)
    cfg = CLIPTextConfig(
        vocab_size=clip_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    seed_for(seed, tag)
    cls = CLIPTextModelWithProjection if projection_dim is not None else CLIPTextModel
    model = cls(cfg).eval()
    return model, tok


def t5_encoder(seed: int, tag: str, d_model: int = 64, layers: int = 2, heads: int = 4):
    tok = make_t5_tokenizer()
    cfg = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    seed_for(seed, tag)
    return T5EncoderModel(cfg).eval(), tok


def clip_vision_model(seed: int, tag: str, hidden_size: int = 32, projection_dim: int = 32):
    cfg = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        hidden_act="gelu",
    )
    seed_for(seed, tag)
    return CLIPVisionModelWithProjection(cfg).eval()


def autoencoder_kl(
    seed: int,
    tag: str,
    block_out_channels=(8, 16, 32, 32),
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    **extra,
):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    seed_for(seed, tag)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    ).eval()


def randomize_(modules, seed: int, tag: str, std: float = 0.02) -> None:
    """Give zero-initialised layers (ControlNet zero convs) small random weights, so they influence the output."""
    seed_for(seed, tag)
    for m in modules:
        for p in m.parameters():
            with torch.no_grad():
                p.normal_(0.0, std)


def pil_image(seed: int, height: int, width: int) -> PIL.Image.Image:
    """A smooth RGB test image made in code (gradients plus seeded low-frequency noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    low = rng.random((4, 4, 3)).astype(np.float32)
    low = np.kron(low, np.ones((height // 4 + 1, width // 4 + 1, 1), np.float32))[:height, :width]
    arr = np.clip(0.6 * base + 0.4 * low, 0.0, 1.0)
    return PIL.Image.fromarray((arr * 255).round().astype(np.uint8))


def pil_mask(height: int, width: int) -> PIL.Image.Image:
    """White (to inpaint) rectangle in the middle of a black mask."""
    m = np.zeros((height, width), np.uint8)
    m[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return PIL.Image.fromarray(m, mode="L")


def pil_edges(seed: int, height: int, width: int) -> PIL.Image.Image:
    """A ControlNet-style condition image (white strokes on black) made in code."""
    rng = np.random.default_rng(seed)
    m = np.zeros((height, width), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            m[rng.integers(0, height), :] = 255
        else:
            m[:, rng.integers(0, width)] = 255
    return PIL.Image.fromarray(np.stack([m] * 3, axis=-1))


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))
