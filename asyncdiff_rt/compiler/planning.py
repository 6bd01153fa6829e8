"""``plan_for``: the measured partition of a pipeline's denoiser for a resolution and ``model_n`` (DESIGN §2, §4).

Steps: example denoiser inputs built from the denoiser's config (the shapes the pipeline will pass at that
resolution); one trace on a ``meta`` twin of the denoiser (no compute; falls back to a real forward when the twin
cannot be built or traced); block costs measured on the target device or read from the disk cache; the
dynamic-programming partition. ``format_plan_table`` prints a plan as ``asyncdiff-rt plan`` shows it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..tools.archs import ARCHITECTURES, SD3_MEDIUM, SD15, SD21, SDXL, build_architecture  # noqa: F401 - re-exported
from .blocks import candidate_blocks
from .cost import arch_hash, device_name, measure_block_costs
from .partition import partition
from .plan import Plan
from .trace import Trace, meta_twin, trace_denoiser

__all__ = [
    "plan_for",
    "plan_for_denoiser",
    "example_inputs",
    "format_plan_table",
    "default_batch",
    "default_resolution",
    "load_pipeline_for_planning",
    "build_architecture",
    "DenoiserOnly",
    "ARCHITECTURES",
]


class DenoiserOnly:
    """A stand-in pipeline holding just a denoiser (``.unet`` or ``.transformer``) and the VAE scale factor: what
    ``plan_for`` needs, without text encoders or a VAE in memory."""

    def __init__(self, denoiser: nn.Module, vae_scale_factor: int = 8, name: str = ""):
        attr = "transformer" if "Transformer" in type(denoiser).__name__ else "unet"
        setattr(self, attr, denoiser)
        self.vae_scale_factor = vae_scale_factor
        self.name = name

    def __repr__(self) -> str:
        return f"DenoiserOnly({self.name or type(getattr(self, 'unet', None) or self.transformer).__name__})"


def load_pipeline_for_planning(
    model: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """What ``asyncdiff-rt plan --model`` names: a built-in architecture (sd15, sd21, sdxl, sd3; random weights),
    a tiny pipeline (``tiny:<kind>``), a local diffusers folder (only its denoiser is loaded) or a model id."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if model in ARCHITECTURES:
        return DenoiserOnly(build_architecture(model, device, dtype), 8, model)
    if model.startswith("tiny:"):
        from ..tiny import make_pipeline

        return make_pipeline(model.split(":", 1)[1], seed=0).to(device=device, dtype=dtype)
    import diffusers

    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            components = json.load(f)
        for attr in ("unet", "transformer"):
            entry = components.get(attr)
            if isinstance(entry, list) and len(entry) == 2 and entry[1]:
                cls = getattr(diffusers, entry[1])
                denoiser = cls.from_pretrained(model, subfolder=attr, torch_dtype=dtype).to(device).eval()
                factor = 8
                vae_config = os.path.join(model, "vae", "config.json")
                if os.path.isfile(vae_config):
                    with open(vae_config) as f:
                        factor = 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
                return DenoiserOnly(denoiser, factor, os.path.basename(os.path.normpath(model)))
        raise ValueError(f"{model} has no unet or transformer in its model_index.json")
    return diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)


def _cfg(denoiser: nn.Module) -> dict[str, Any]:
    return dict(getattr(denoiser, "config", {}) or {})


def default_batch(denoiser: nn.Module, pipe: Any = None) -> int:
    """2 when the pipeline runs classifier-free guidance by default (two denoiser rows per image), else 1.

    Every pipeline in DESIGN §7 defaults to a guidance scale above 1; UNets with a guidance embedding
    (``time_cond_proj_dim``, LCM-style) and guidance-distilled DiTs (``guidance_embeds``) take one row.
    """
    cfg = _cfg(denoiser)
    if cfg.get("time_cond_proj_dim") is not None or cfg.get("guidance_embeds"):
        return 1
    return 2


def default_resolution(pipe: Any, denoiser: nn.Module) -> tuple[int, int]:
    """The pipeline's default output size in pixels: the denoiser's sample size times the VAE scale factor."""
    size = _cfg(denoiser).get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    factor = _pipe_int(pipe, "vae_scale_factor", 8)
    return int(size) * factor, int(size) * factor


def _pipe_int(pipe: Any, attr: str, default: int) -> int:
    value = getattr(pipe, attr, None) if pipe is not None else None
    return int(value) if isinstance(value, int) and value > 0 else default


def example_inputs(
    denoiser: nn.Module,
    height: int,
    width: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device | str,
    pipe: Any = None,
    **overrides: Any,
) -> tuple[tuple, dict]:
    """(args, kwargs) shaped like the pipeline's denoiser call at ``height`` x ``width`` pixels.

    ``overrides`` replace or add keyword arguments (e.g. ``num_frames`` for video, ``encoder_hidden_states`` of
    another length, ``down_block_additional_residuals`` for ControlNet).
    """
    compose = getattr(denoiser, "example_inputs_from", None)  # ControlNet + UNet (controlnet.py)
    if compose is not None:
        args, kwargs = example_inputs(denoiser.unet, height, width, batch, dtype, device, pipe, **overrides)
        return compose(args, kwargs, height, width)
    cfg = _cfg(denoiser)
    name = type(denoiser).__name__
    vae = _pipe_int(pipe, "vae_scale_factor", 8)
    if height % vae or width % vae:
        raise ValueError(f"height and width must be multiples of the VAE scale factor {vae}, got {height}x{width}")
    h, w = height // vae, width // vae
    text_len = 77
    tok = getattr(pipe, "tokenizer", None) if pipe is not None else None
    if tok is not None and isinstance(getattr(tok, "model_max_length", None), int) and tok.model_max_length < 10000:
        text_len = tok.model_max_length

    def t(*shape, dt=dtype):
        return (
            torch.randn(*shape, dtype=dt, device=device)
            if dt.is_floating_point
            else torch.zeros(*shape, dtype=dt, device=device)
        )

    timestep = torch.tensor(999.0, device=device)
    kwargs: dict[str, Any] = {}
    if name == "SD3Transformer2DModel" or ("joint_attention_dim" in cfg and "pooled_projection_dim" in cfg):
        seq = overrides.pop("text_len", text_len + overrides.pop("max_sequence_length", 256))
        kwargs = {
            "hidden_states": t(batch, cfg["in_channels"], h, w),
            "encoder_hidden_states": t(batch, seq, cfg["joint_attention_dim"]),
            "pooled_projections": t(batch, cfg["pooled_projection_dim"]),
            "timestep": torch.full((batch,), 999.0, device=device),
        }
        kwargs.update(overrides)
        return (), kwargs
    if "down_blocks" not in dict(denoiser.named_children()):
        raise ValueError(
            f"plan_for does not know how {name} is called; pass its inputs to plan_for_denoiser(args=, kwargs=)"
        )
    in_ch = cfg.get("in_channels", 4)
    cross = cfg.get("cross_attention_dim", 768)
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if name == "UNetSpatioTemporalConditionModel":
        frames = overrides.pop("num_frames", cfg.get("num_frames", 25))
        sample = t(batch, frames, in_ch, h, w)
        kwargs["encoder_hidden_states"] = t(batch, 1, cross)
        n_ids = cfg.get("projection_class_embeddings_input_dim", 768) // cfg.get("addition_time_embed_dim", 256)
        kwargs["added_time_ids"] = t(batch, n_ids)
    elif name in ("UNetMotionModel", "UNet3DConditionModel"):
        frames = overrides.pop("num_frames", 16)
        sample = t(batch, in_ch, frames, h, w)
        # AnimateDiff's pipeline repeats the prompt embeddings per frame; UNet3D repeats them itself
        rows = batch * frames if name == "UNetMotionModel" else batch
        kwargs["encoder_hidden_states"] = t(rows, text_len, cross)
    else:
        sample = t(batch, in_ch, h, w)
        kwargs["encoder_hidden_states"] = t(batch, text_len, cross)
    if cfg.get("addition_embed_type") == "text_time":
        add_dim = cfg.get("addition_time_embed_dim") or 256
        total = cfg.get("projection_class_embeddings_input_dim") or 2816
        te = getattr(getattr(pipe, "text_encoder_2", None), "config", None)
        text_dim = getattr(te, "projection_dim", None)
        if text_dim is None:
            text_dim = next((total - k * add_dim for k in (6, 5) if total - k * add_dim > 0), total)
        n_ids = (total - text_dim) // add_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": t(batch, text_dim), "time_ids": t(batch, n_ids)}
    if cfg.get("class_embed_type") is None and cfg.get("num_class_embeds"):
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)  # x4 upscaler: noise level
    kwargs.update(overrides)
    return (sample, timestep), kwargs


def _input_shapes(args: tuple, kwargs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, a in enumerate(args):
        out[f"arg{i}"] = list(a.shape) if isinstance(a, torch.Tensor) else repr(a)
    flat = pytree.tree_flatten_with_path(kwargs)[0]
    for path, v in flat:
        if isinstance(v, torch.Tensor):
            out[pytree.keystr(path)] = list(v.shape)
    return out


def _to_meta(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, tree)


def trace_for_plan(
    denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str], trace_on: str = "meta"
) -> tuple[Trace, str]:
    """Trace on a meta twin (no compute) or for real; returns the trace and where it ran."""
    if trace_on not in ("meta", "real"):
        raise ValueError(f"trace_on must be 'meta' or 'real', got {trace_on!r}")
    if trace_on == "meta":
        try:
            twin = meta_twin(denoiser)
            margs, mkwargs = _to_meta((args, kwargs))
            return trace_denoiser(twin, margs, mkwargs, blocks), "meta"
        except Exception as exc:  # an op without a meta kernel, a twin that cannot be built: trace for real
            trace = trace_denoiser(denoiser, args, kwargs, blocks)
            trace.warnings.append(f"meta trace failed ({type(exc).__name__}: {exc}); traced with a real forward")
            return trace, "real"
    return trace_denoiser(denoiser, args, kwargs, blocks), "real"


def plan_for_denoiser(
    denoiser: nn.Module,
    model_n: int,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    granularity: str = "fine",
    keep_head_tail: bool = False,
    cache: bool = True,
    *,
    pipe: Any = None,
    args: tuple | None = None,
    kwargs: dict | None = None,
    bandwidth_Bps: float | None = None,
    slack: float = 0.0,
    repeats: int = 20,
    trace_on: str = "meta",
    costs: dict[str, float] | None = None,
    **denoiser_call_overrides: Any,
) -> Plan:
    """``plan_for`` on a bare denoiser. ``args``/``kwargs`` give its call directly (else built from its config at
    height x width); ``costs`` skips the measurement (block -> ms)."""
    param = next(denoiser.parameters(), None)
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    device = (
        torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    )
    if device.type == "meta":
        raise ValueError("plan_for needs a real device to time blocks on")
    if batch is None:
        batch = default_batch(denoiser, pipe)
    if args is None and kwargs is None:
        if height is None or width is None:
            default_h, default_w = default_resolution(pipe, denoiser)
            height, width = height or default_h, width or default_w
        args, kwargs = example_inputs(denoiser, height, width, batch, dtype, device, pipe, **denoiser_call_overrides)
    args, kwargs = tuple(args or ()), dict(kwargs or {})

    moved = param is not None and (param.device != device or param.dtype != dtype)
    if moved:
        old_device, old_dtype = param.device, param.dtype
        nn.Module.to(denoiser, device=device, dtype=dtype)
    try:
        blocks = candidate_blocks(denoiser, granularity)
        trace, traced_on = trace_for_plan(denoiser, args, kwargs, blocks, trace_on)
        order = [b for b in trace.order if b in set(blocks)]
        if costs is None:
            costs = measure_block_costs(denoiser, args, kwargs, order, trace, device, repeats=repeats, cache=cache)
    finally:
        if moved:
            nn.Module.to(denoiser, device=old_device, dtype=old_dtype)
    never = [b for b in blocks if b not in set(order)]
    meta = {
        "arch": f"{type(denoiser).__name__}:{arch_hash(denoiser)}",
        "shape": _input_shapes(args, kwargs),
        "height": height,
        "width": width,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device),
        "granularity": granularity,
        "traced_on": traced_on,
        "order": order,
        "block_ms": {b: float(costs[b]) for b in order},
        "denoiser_ms": getattr(costs, "denoiser_ms", None),
        "costs_from_cache": getattr(costs, "from_cache", False),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if never:
        meta["not_called"] = never  # listed candidates this call never runs: left replicated (never used)
    if trace.warnings:
        meta["trace_warnings"] = trace.warnings
    plan = partition(
        order,
        costs,
        trace,
        model_n,
        bandwidth_Bps=bandwidth_Bps,
        keep_head_tail=keep_head_tail,
        meta=meta,
        slack=slack,
    )
    return plan


def plan_for(
    pipe: Any,
    model_n: int,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    granularity: str = "fine",
    keep_head_tail: bool = False,
    cache: bool = True,
    controlnet: str = "auto",
    **denoiser_call_overrides: Any,
) -> Plan:
    """The measured partition of ``pipe``'s denoiser into ``model_n`` segments at ``height`` x ``width`` pixels
    (default: the pipeline's default size, the denoiser's sample_size times the VAE scale factor).

    ``batch`` defaults to 2 when classifier-free guidance applies (the pipelines' default) else 1; ``dtype`` and
    ``device`` to the denoiser's. Block costs are cached on disk (``cache=False`` measures again). Keyword
    arguments ``bandwidth_Bps``, ``slack``, ``repeats``, ``trace_on`` ("meta" or "real") and ``costs`` pass to
    ``plan_for_denoiser``; any other keyword overrides an argument of the denoiser's call (e.g. ``num_frames``).
    ``controlnet`` as AsyncDiff's: with "auto"/"blocks" a ControlNet pipeline's plan lists ControlNet and UNet
    blocks (``controlnet.*``, ``unet.*``).
    """
    from ..models.controlnet import controlnet_mode
    from ..models.denoiser import find_denoiser

    with controlnet_mode(pipe, controlnet):
        _, denoiser = find_denoiser(pipe)
        return plan_for_denoiser(
            denoiser,
            model_n,
            height,
            width,
            batch,
            dtype,
            device,
            granularity,
            keep_head_tail,
            cache,
            pipe=pipe,
            **denoiser_call_overrides,
        )


# ------------------------------------------------------------------------------------------------------ the table
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _runs(blocks: list[str], order: list[str] | None) -> str:
    """'first .. last' per run of consecutive blocks in call order (a head+tail segment has two runs)."""
    if not blocks:
        return "-"
    if not order:
        return blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]}"
    pos = {b: i for i, b in enumerate(order)}
    idx = sorted(pos[b] for b in blocks if b in pos)
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b is None or b != a + 1:
            runs.append((start, a))
            if b is not None:
                start = b
    # a wrap-around segment reads tail first, then head: the order the rotated plan executes it in
    if len(runs) == 2 and runs[0][0] == 0 and runs[1][1] == len(order) - 1:
        runs = runs[::-1]
    return " + ".join(order[a] if a == b else f"{order[a]} .. {order[b]}" for a, b in runs)


def format_plan_table(plan: Plan) -> str:
    """Segment, #blocks, first..last block, ms, share %, bytes in, bytes out; then split quality sum/max."""
    order = plan.meta.get("order")
    costs = [s.cost_ms for s in plan.segments]
    total = sum(c for c in costs if c is not None) or None
    rows = [("segment", "#blocks", "blocks (first .. last)", "ms", "share %", "bytes in", "bytes out")]
    for i, s in enumerate(plan.segments):
        share = f"{100 * s.cost_ms / total:.1f}" if total and s.cost_ms is not None else "-"
        rows.append(
            (
                f"S{i}",
                str(len(s.blocks)),
                _runs(s.blocks, order),
                f"{s.cost_ms:.3f}" if s.cost_ms is not None else "-",
                share,
                _fmt_bytes(s.bytes_in),
                _fmt_bytes(s.bytes_out),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6}
    lines = []
    for k, r in enumerate(rows):
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    head = []
    m = plan.meta
    if m:
        desc = [m.get("arch", "").split(":")[0]]
        if m.get("height"):
            desc.append(f"{m['height']}x{m['width']}")
        if m.get("batch"):
            desc.append(f"batch {m['batch']}")
        for k in ("dtype", "device", "granularity"):
            if m.get(k):
                desc.append(str(m[k]))
        desc = [d for d in desc if d]
        head.append(f"Plan {plan.hash()}" + (": " + ", ".join(desc) if desc else ""))
    q = plan.split_quality()
    tail = []
    if q is not None:
        tail.append(
            f"split quality sum/max = {q:.3f} (ideal {plan.model_n}); slowest segment {max(costs):.3f} ms "
            f"of {total:.3f} ms"
        )
    if m.get("denoiser_ms"):
        tail.append(f"whole denoiser measured at {m['denoiser_ms']:.3f} ms (blocks sum {total:.3f} ms)")
    if m.get("keep_head_tail"):
        tail.append(f"head and tail kept together (head = first {m.get('head_blocks')} block(s) in call order)")
    return "\n".join(head + lines + tail)
