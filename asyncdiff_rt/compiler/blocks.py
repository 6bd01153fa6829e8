"""Which modules of a denoiser are *blocks* (docs/strategies.md): the units a plan assigns to segments.

Everything not listed stays replicated: embeddings (time, class, added condition, text/context, patch), norms and
activations around the output, and the glue between blocks.

Granularities
-------------
``"coarse"``: UNets at the level of their stage blocks' parts — ``conv_in``, every ``down_blocks.i.resnets.j``,
``down_blocks.i.attentions.j``, ``down_blocks.i.downsamplers.0`` (and ``motion_modules.j``, ``temp_convs.j``,
``temp_attentions.j`` where present), the whole ``mid_block``, the same parts of ``up_blocks.i``, ``conv_out``
(SDXL: 32 blocks, SD2.1: 44; MEASUREMENTS.md's 33/45 counted one embedding module more). DiTs: their
``*blocks.k``.

``"fine"`` (default): the same, but every attention model inside a UNet (anything holding a ``transformer_blocks``
ModuleList: ``Transformer2DModel``, ``TransformerSpatioTemporalModel``, AnimateDiff motion modules,
``TransformerTemporalModel``) is opened, and the mid block is split into its parts. An opened attention model
contributes its input ``<name>.norm`` (a GroupNorm), ``<name>.proj_in``, each ``<name>.transformer_blocks.k``
(interleaved by index with any other block list it holds, e.g. ``temporal_transformer_blocks.k``) and
``<name>.proj_out`` as blocks of their own. We list proj_in/proj_out rather than replicate them: at SDXL-1024 they
are ~1% of the step (about 150 GFLOP at batch 2), which every rank would pay again at n=8. The norm is listed
because a forward that replays a block still runs the glue that feeds it: as glue it ran on every rank whose
forward passes the attention model, and the ε rank's forward passes them all (benchmarks/rank_glue.py: the largest
glue operator on that rank, SD2.1 n = 3). As a block, a rank that replays the model skips it (nothing reads its
output there). ``time_pos_embed``/``time_mixer``, the layout copies and the residual add stay replicated glue.

Order is the call order as known from the structure of diffusers' blocks; the tracer (``trace.trace_denoiser``)
records the true order and ``plan_for`` uses that one.
"""

from __future__ import annotations

from torch import nn

from ..models.base import REPLICATED_TOP_LEVEL

__all__ = ["candidate_blocks", "check_no_nesting", "REPLICATED_TOP_LEVEL"]


# Order of the parts of a UNet stage block at one index i (diffusers calls resnet, then its attention, then the
# temporal/motion modules; UNet3D calls temp_convs right after the resnet).
_RESNET_LISTS = ("resnets", "temp_convs")
_ATTENTION_LISTS = ("attentions", "temp_attentions", "motion_modules")
_SAMPLER_LISTS = ("downsamplers", "upsamplers")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_attention_model(module: nn.Module) -> bool:
    return isinstance(getattr(module, "transformer_blocks", None), nn.ModuleList)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _open_attention_model(module: nn.Module, prefix: str) -> list[str]:
    """The input GroupNorm, proj_in, the transformer blocks (lists interleaved by index), proj_out."""
    out: list[str] = []
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.GroupNorm) and _has_params(norm):
        out.append(_join(prefix, "norm"))
    proj_in = getattr(module, "proj_in", None)
    if isinstance(proj_in, nn.Module) and _has_params(proj_in):
        out.append(_join(prefix, "proj_in"))
    lists = [(n, c) for n, c in module.named_children() if isinstance(c, nn.ModuleList) and len(c) > 0]
    longest = max((len(c) for _, c in lists), default=0)
    for i in range(longest):
        for n, c in lists:
            if i < len(c):
                out.append(f"{prefix}.{n}.{i}")
    proj_out = getattr(module, "proj_out", None)
    if isinstance(proj_out, nn.Module) and _has_params(proj_out):
        out.append(_join(prefix, "proj_out"))
    return out


def _unit(module: nn.Module, name: str, fine: bool) -> list[str]:
    if fine and _is_attention_model(module):
        return _open_attention_model(module, name)
    return [name] if _has_params(module) else []


def _open_stage_block(block: nn.Module, prefix: str, fine: bool, is_mid: bool) -> list[str]:
    """The parts of a down/mid/up block in call order."""
    lists = {n: c for n, c in block.named_children() if isinstance(c, nn.ModuleList)}
    known = set(_RESNET_LISTS) | set(_ATTENTION_LISTS) | set(_SAMPLER_LISTS)
    other_lists = [n for n in lists if n not in known]
    out: list[str] = []

    def emit(list_name: str, i: int) -> None:
        ml = lists.get(list_name)
        if ml is not None and i < len(ml):
            out.extend(_unit(ml[i], f"{prefix}.{list_name}.{i}", fine))

    longest = max((len(c) for c in lists.values()), default=0)
    if is_mid:
        # UNetMidBlock*: resnets[0], then (attention parts i, resnets[i+1]) pairs.
        for n in _RESNET_LISTS:
            emit(n, 0)
        for i in range(longest):
            for n in _ATTENTION_LISTS:
                emit(n, i)
            for n in other_lists:
                emit(n, i)
            for n in _RESNET_LISTS:
                emit(n, i + 1)
    else:
        for i in range(longest):
            for n in _RESNET_LISTS + _ATTENTION_LISTS:
                emit(n, i)
            for n in other_lists:
                emit(n, i)
    for n in _SAMPLER_LISTS:
        for i in range(len(lists.get(n, []))):
            emit(n, i)
    # Parameterised direct children outside the lists (rare): their own blocks, so nothing heavy is replicated.
    for n, c in block.named_children():
        if not isinstance(c, nn.ModuleList) and _has_params(c):
            out.append(f"{prefix}.{n}")
    return out


def _unet_blocks(denoiser: nn.Module, fine: bool) -> list[str]:
    out: list[str] = []
    children = dict(denoiser.named_children())
    handled = set()
    for name in ("conv_in", "transformer_in"):
        if name in children:
            handled.add(name)
            out.extend(_unit(children[name], name, fine))
    if "controlnet_cond_embedding" in children:  # ControlNetModel used as a denoiser of its own
        handled.add("controlnet_cond_embedding")
        out.append("controlnet_cond_embedding")
    for stage in ("down_blocks", "mid_block", "up_blocks"):
        module = children.get(stage)
        handled.add(stage)
        if module is None:
            continue
        if isinstance(module, nn.ModuleList):
            for i, block in enumerate(module):
                out.extend(_open_stage_block(block, f"{stage}.{i}", fine, is_mid=False))
        elif fine:
            out.extend(_open_stage_block(module, stage, fine, is_mid=True))
        elif _has_params(module):
            out.append(stage)
    tail = []
    for name, module in children.items():
        if name in handled or name in REPLICATED_TOP_LEVEL or name == "conv_out" or not _has_params(module):
            continue
        if isinstance(module, nn.ModuleList):
            out.extend(f"{name}.{i}" for i, m in enumerate(module) if _has_params(m))
        else:
            tail.append(name)
    out.extend(tail)
    if "conv_out" in children:
        out.append("conv_out")
    return out


def _dit_blocks(denoiser: nn.Module) -> list[str]:
    out: list[str] = []
    for name, module in denoiser.named_children():
        if isinstance(module, nn.ModuleList) and name.endswith("blocks"):
            out.extend(f"{name}.{i}" for i, m in enumerate(module) if _has_params(m))
    return out


def candidate_blocks(denoiser: nn.Module, granularity: str = "fine") -> list[str]:
    """Qualified names of the blocks of ``denoiser`` at ``granularity`` ("fine" or "coarse"), in call order."""
    if granularity not in ("fine", "coarse"):
        raise ValueError(f"granularity must be 'fine' or 'coarse', got {granularity!r}")
    fine = granularity == "fine"
    parts = getattr(denoiser, "composite_parts", None)  # e.g. ControlNet + UNet (controlnet.py): each part's blocks
    if parts:
        return [f"{p}.{b}" for p in parts for b in candidate_blocks(getattr(denoiser, p), granularity)]
    children = dict(denoiser.named_children())
    if "down_blocks" in children or "up_blocks" in children:
        blocks = _unet_blocks(denoiser, fine)
    elif any(isinstance(m, nn.ModuleList) and n.endswith("blocks") for n, m in children.items()):
        blocks = _dit_blocks(denoiser)
    else:
        raise ValueError(
            f"cannot find blocks in {type(denoiser).__name__}: expected a diffusers UNet (down_blocks/up_blocks) "
            "or a DiT (a ModuleList named '*blocks'); pass an explicit plan= listing its modules"
        )
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no parameterised blocks to partition")
    check_no_nesting(blocks)
    return blocks


def check_no_nesting(blocks: list[str]) -> None:
    """Raise ValueError if a name appears twice or a module is listed together with one of its parents."""
    seen = set()
    for b in blocks:
        if b in seen:
            raise ValueError(f"block {b!r} listed twice")
        seen.add(b)
    for b in blocks:
        parts = b.split(".")
        for j in range(1, len(parts)):
            if ".".join(parts[:j]) in seen:
                raise ValueError(f"block {b!r} listed together with its parent {'.'.join(parts[:j])!r}")
