"""What a benchmark runs, by name: a real architecture with random weights (tools/archs.py: sd15 ... flux) or a tiny
pipeline (``tiny:<kind>``: the same code paths on a CPU in seconds, figures that mean nothing). Per model: the
pipeline, its call (latent output, seeded noise added by the caller), dtype, step count, size, denoiser batch and
whether it runs classifier-free guidance. Shared by `bench` (one process, several GPUs) and `bench --emulate`."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY", "tiny_kind", "check_model", "model_dtype", "model_steps", "model_runs_cfg", "bench_pipeline"]

TINY = "tiny:"


def tiny_kind(model: str) -> str | None:
    return model[len(TINY) :] if model.startswith(TINY) else None


def check_model(model: str) -> None:
    """A clear error for a name that is neither an architecture nor a tiny kind (imports the tiny pipelines: call
    it where CUDA may start, not in the `--emulate` parent)."""
    from .archs import ARCHS

    kind = tiny_kind(model)
    if kind is None:
        if model not in ARCHS:
            raise ValueError(f"--model {model!r}: one of {', '.join(ARCHS)} or tiny:<kind>")
        return
    from ..tiny import KINDS

    if kind not in KINDS:
        raise ValueError(f"--model {model!r}: tiny kinds are {', '.join(f'tiny:{k}' for k in KINDS)}")


def _arch(model: str) -> str | None:
    """The real architecture a model is, or is shaped like (tiny:flux -> flux), if there is one."""
    from .archs import ARCHS

    name = tiny_kind(model) or model
    return name if name in ARCHS else None


def model_dtype(model: str, device: torch.device | str) -> torch.dtype:
    """The architecture's own dtype on a GPU (bf16 for FLUX.1, fp16 for the others); float32 on a CPU."""
    from .archs import default_dtype

    if torch.device(device).type != "cuda":
        return torch.float32
    arch = _arch(model)
    return default_dtype(arch) if arch else torch.float16


def model_steps(model: str) -> int:
    """The model card's step count: FLUX.1-dev 28, -schnell 4, the others 50 (tiny kinds: their architecture's)."""
    from .archs import default_steps

    arch = _arch(model)
    return default_steps(arch) if arch else 50


def model_runs_cfg(model: str) -> bool:
    """Whether the model's default call runs classifier-free guidance (a CFG batch to split): not FLUX.1."""
    from .archs import runs_cfg

    arch = _arch(model)
    return runs_cfg(arch) if arch else True


def bench_pipeline(model: str, device: str, steps: int, size: int | None = None) -> tuple[Any, dict]:
    """The pipeline (progress bar off) and its call's keyword arguments, without a generator (`size`: height and
    width in pixels; None: the model's own). Real architectures
    take random prompt embeddings (no text encoders exist, none run); tiny kinds run their tiny text encoders."""
    dtype = model_dtype(model, device)
    kind = tiny_kind(model)
    if kind is not None:
        from ..tiny import call_kwargs, make_pipeline

        pipe = make_pipeline(kind, dtype, device)
        kwargs = call_kwargs(kind, steps, device=device, output_type="latent", size=size)
    else:
        from .archs import build_pipeline, prompt_kwargs

        pipe = build_pipeline(model, dtype=dtype, device=device)
        kwargs = {**prompt_kwargs(model, pipe), "num_inference_steps": steps, "output_type": "latent"}
        if size:
            kwargs.update(height=size, width=size)
    pipe.set_progress_bar_config(disable=True)
    kwargs.pop("generator", None)
    return pipe, kwargs
