"""Data flow and block output layouts of one call signature, traced on a meta twin (no weights, no compute): what
a strategy needs to route block outputs between ranks and to allocate their buffers (runtime/buffers.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from .trace import Trace, trace_denoiser

__all__ = ["call_signature", "to_meta", "trace_layouts"]


def to_meta(tree: Any) -> Any:
    """The same tree with every tensor replaced by an empty one of its shape and dtype on the meta device."""
    return pytree.tree_map(
        lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x, tree
    )


def call_signature(tree: Any) -> tuple:
    """The tensor shapes and dtypes a call passes, by argument path: what its trace and buffers depend on."""
    flat, _ = pytree.tree_flatten_with_path(tree)
    return tuple((pytree.keystr(path), tuple(x.shape), x.dtype) for path, x in flat if isinstance(x, torch.Tensor))


def trace_layouts(
    twin: nn.Module, blocks: list[str], args: tuple, kwargs: dict
) -> tuple[Trace, dict[str, tuple[Any, list[Any]]]]:
    """The trace of one call on `twin` (a meta twin of the denoiser) and each block's output layout
    (tree spec, meta leaves)."""
    layouts: dict[str, tuple[Any, list[Any]]] = {}
    modules = dict(twin.named_modules())
    handles = []
    for name in blocks:

        def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
            if name in layouts:
                raise ConfigError(f"block {name!r} runs more than once per denoiser call: list its parts instead")
            leaves, spec = pytree.tree_flatten(out)
            layouts[name] = (spec, leaves)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        meta_args, meta_kwargs = to_meta((args, kwargs))
        trace = trace_denoiser(twin, meta_args, meta_kwargs, blocks)
    finally:
        for h in handles:
            h.remove()
    return trace, layouts
