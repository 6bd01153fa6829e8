"""The real architectures with random weights: SD1.5, SD2.1, SDXL UNets, the SD3-medium, SD3.5-medium,
SD3.5-large and FLUX.1-dev / -schnell transformers, with real-config VAEs, as whole diffusers pipelines that take
prompt embeddings directly (no text encoders, no downloads). Speed does not depend on weight values,
so benchmarks and `asyncdiff-rt plan` use these.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "ARCHITECTURES",
    "SD15",
    "SD21",
    "SDXL",
    "SD3_MEDIUM",
    "SD35_MEDIUM",
    "SD35_LARGE",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "build_architecture",
    "build_pipeline",
    "prompt_kwargs",
    "default_size",
    "default_dtype",
    "default_steps",
    "runs_cfg",
]

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

# stabilityai/stable-diffusion-2-1, unet/config.json
SD21 = dict(
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=True,
    use_linear_projection=True,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

# runwayml/stable-diffusion-v1-5, unet/config.json (an extra; not asked for by the table in MEASUREMENTS.md)
SD15 = dict(
    SD21,
    attention_head_dim=8,
    cross_attention_dim=768,
    sample_size=64,
    upcast_attention=False,
    use_linear_projection=False,
)

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json: MMDiT-X, dual attention in blocks 0-12
SD35_MEDIUM = dict(
    SD3_MEDIUM,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

# stabilityai/stable-diffusion-3.5-large, transformer/config.json
SD35_LARGE = dict(
    SD3_MEDIUM,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    qk_norm="rms_norm",
)

# black-forest-labs/FLUX.1-dev, transformer/config.json: 19 double-stream then 38 single-stream blocks, 11.9 B
# parameters (a double block 339.8 M, a single one 141.6 M)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# black-forest-labs/FLUX.1-schnell: the same without the guidance embedding
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)

# name -> (diffusers class, config): real architectures, built with random weights for plans and benchmarks
ARCHITECTURES = {
    "sd15": ("UNet2DConditionModel", SD15),
    "sd21": ("UNet2DConditionModel", SD21),
    "sdxl": ("UNet2DConditionModel", SDXL),
    "sd3": ("SD3Transformer2DModel", SD3_MEDIUM),
    "sd35_medium": ("SD3Transformer2DModel", SD35_MEDIUM),
    "sd35_large": ("SD3Transformer2DModel", SD35_LARGE),
    "flux": ("FluxTransformer2DModel", FLUX_DEV),
    "flux_schnell": ("FluxTransformer2DModel", FLUX_SCHNELL),
}


_SD3_VAE = {
    **_SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}

# black-forest-labs/FLUX.1-dev, vae/config.json
_FLUX_VAE = {**_SD3_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}

# whole pipelines: the denoiser's config above, a real-config VAE, and the text embeddings' shapes
ARCHS: dict[str, dict[str, Any]] = {
    "sd15": dict(size=512, unet=SD15, vae=_SD_VAE, text_dim=768, text_len=77),
    "sd21": dict(
        size=768,
        unet=SD21,
        vae={**_SD_VAE, "sample_size": 768},
        text_dim=1024,
        text_len=77,
        prediction_type="v_prediction",
    ),
    "sdxl": dict(
        size=1024,
        unet=SDXL,
        vae={**_SD_VAE, "sample_size": 1024, "force_upcast": True},
        text_dim=2048,
        text_len=77,
        pooled_dim=1280,
    ),
    "sd3": dict(
        size=1024,
        transformer=SD3_MEDIUM,
        vae=_SD3_VAE,
        text_dim=4096,
        text_len=333,  # 77 CLIP + 256 T5 tokens
        pooled_dim=2048,
    ),
    # SD3.5 rides on the SD3 pipeline: the same text encoders, VAE and scheduler
    "sd35_medium": dict(size=1024, transformer=SD35_MEDIUM, vae=_SD3_VAE, text_dim=4096, text_len=333, pooled_dim=2048),
    "sd35_large": dict(size=1024, transformer=SD35_LARGE, vae=_SD3_VAE, text_dim=4096, text_len=333, pooled_dim=2048),
    # FLUX.1: T5 embeddings (512 tokens) and CLIP's pooled output are all the transformer sees of the prompt;
    # guidance-distilled, so no negative embeddings unless asked for (true CFG, `prompt_kwargs(negative=True)`).
    # bf16 as its checkpoints ship (fp16 overflows in its activations); the model cards' step counts
    "flux": dict(
        size=1024,
        transformer=FLUX_DEV,
        vae=_FLUX_VAE,
        text_dim=4096,
        text_len=512,
        pooled_dim=768,
        negative=False,
        dtype=torch.bfloat16,
        steps=28,
    ),
    "flux_schnell": dict(
        size=1024,
        transformer=FLUX_SCHNELL,
        vae=_FLUX_VAE,
        text_dim=4096,
        text_len=512,  # the pipeline's default max_sequence_length (schnell's model card passes 256)
        pooled_dim=768,
        negative=False,
        dtype=torch.bfloat16,
        steps=4,
    ),
}

# the pipeline class of each transformer-based architecture (the others are UNet pipelines)
_DIT_PIPELINES = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline"}


@contextlib.contextmanager
def _made_in(device: torch.device | str, dtype: torch.dtype):
    """Parameters created on `device` in `dtype` directly: FLUX.1-dev made in float32 first would take 47.6 GB
    (twice its bf16 size) before the cast, and four emulated GPUs build it at once on one device."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else old)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_architecture(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The real `name` denoiser alone (see ARCHITECTURES) with random weights, on `device` ("meta" is free)."""
    import diffusers

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    cls_name, config = ARCHITECTURES[name]
    with _made_in(device, dtype):
        model = getattr(diffusers, cls_name).from_config(config)
    return torch.nn.Module.to(model, dtype=dtype).eval()


def default_size(name: str) -> int:
    return ARCHS[name]["size"]


def default_dtype(name: str) -> torch.dtype:
    """What the model runs in on a GPU: bf16 for FLUX.1, fp16 for the others."""
    return ARCHS[name].get("dtype", torch.float16)


def default_steps(name: str) -> int:
    return ARCHS[name].get("steps", 50)


def runs_cfg(name: str) -> bool:
    """Whether the pipeline runs classifier-free guidance by default (FLUX.1 is guidance-distilled: it does not)."""
    return ARCHS[name].get("negative", True)


def _scheduler(name: str, spec: dict[str, Any]) -> Any:
    import diffusers as d

    if name == "flux":  # FLUX.1-dev: sigmas shifted by the image's sequence length
        return d.FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if name == "flux_schnell":
        return d.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    if "transformer" in spec:  # SD3, SD3.5
        return d.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return d.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=spec.get("prediction_type", "epsilon"),
    )


def build_pipeline(name: str, dtype: torch.dtype | None = None, device: str = "cuda", seed: int = 0) -> Any:
    """A diffusers pipeline of the real architecture `name` with random weights (no text encoders), in `dtype`
    (default: `default_dtype(name)`)."""
    import diffusers as d

    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}: one of {', '.join(ARCHS)}")
    spec = ARCHS[name]
    dtype = dtype or default_dtype(name)
    torch.manual_seed(seed)
    scheduler = _scheduler(name, spec)
    with _made_in(device, dtype):  # weights made where they live, in their dtype: no host copy, no float32 copy
        vae = d.AutoencoderKL(**spec["vae"])
        if "transformer" in spec:
            cls_name = ARCHITECTURES[name][0]
            denoiser = getattr(d, cls_name).from_config(spec["transformer"])
            pipeline_cls = getattr(d, _DIT_PIPELINES[cls_name])
            no_text = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
            if pipeline_cls is d.StableDiffusion3Pipeline:
                no_text.update(text_encoder_3=None, tokenizer_3=None)
            pipe = pipeline_cls(transformer=denoiser, scheduler=scheduler, vae=vae, **no_text)
        else:
            denoiser = d.UNet2DConditionModel.from_config(spec["unet"])
            if name == "sdxl":
                pipe = d.StableDiffusionXLPipeline(
                    vae=vae,
                    text_encoder=None,
                    text_encoder_2=None,
                    tokenizer=None,
                    tokenizer_2=None,
                    unet=denoiser,
                    scheduler=scheduler,
                )
            else:
                pipe = d.StableDiffusionPipeline(
                    vae=vae,
                    text_encoder=None,
                    tokenizer=None,
                    unet=denoiser,
                    scheduler=scheduler,
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
    pipe.to(device=device, dtype=dtype)
    return pipe


def prompt_kwargs(name: str, pipe: Any, batch: int = 1, seed: int = 0, negative: bool | None = None) -> dict[str, Any]:
    """Random prompt embeddings of the right shapes (what the text encoders would return) and the call size.

    negative: also negative embeddings (classifier-free guidance). Default: as the model runs by default (yes,
    except for the guidance-distilled FLUX.1); for FLUX, True also sets ``true_cfg_scale`` 4 (its pipeline runs
    CFG only above 1, calling the transformer twice per step).
    """
    spec = ARCHS[name]
    if negative is None:
        negative = spec.get("negative", True)
    dev, dtype = pipe._execution_device, pipe.vae.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    kwargs: dict[str, Any] = {
        "prompt_embeds": rand(batch, spec["text_len"], spec["text_dim"]),
        "height": spec["size"],
        "width": spec["size"],
    }
    if negative:
        kwargs["negative_prompt_embeds"] = rand(batch, spec["text_len"], spec["text_dim"])
    if "pooled_dim" in spec:
        kwargs["pooled_prompt_embeds"] = rand(batch, spec["pooled_dim"])
        if negative:
            kwargs["negative_pooled_prompt_embeds"] = rand(batch, spec["pooled_dim"])
    if negative and name.startswith("flux"):
        kwargs["true_cfg_scale"] = 4.0
    return kwargs
