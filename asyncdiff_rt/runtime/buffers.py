"""Static buffers: where a rank keeps the block outputs other ranks computed, at fixed addresses.

Note [static buffers]
    A CUDA graph records the addresses it reads. The forward of a rank reads the outputs of blocks it does not
    own from this store (a replay hands out fresh copies of them, so in-place glue cannot corrupt them), and the
    transport writes the next round's values into the same tensors, in place, on the communication stream,
    ordered after the forward that read them (Note [stream ordering] in csrc/streams.h). So the store's tensors
    are allocated once per call signature, from the layouts the meta trace recorded, and are never replaced
    until the signature changes: only their contents move. A block whose output this rank never reads gets a
    zero placeholder of the right layout instead (the glue still needs its shape). The local transport, which
    runs every rank view in one process, copies each round's fresh outputs in with `keep`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["BlockStore", "empty_from_meta"]


def empty_from_meta(x: Any, device: torch.device) -> Any:
    return torch.empty(x.shape, dtype=x.dtype, device=device) if isinstance(x, torch.Tensor) else x


def tensors(leaves: list[Any]) -> list[torch.Tensor]:
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class BlockStore:
    """Per call signature: block -> (leaves, tree spec) of its owner's last output, at fixed addresses."""

    def __init__(self, device: torch.device):
        self.device = device
        self.layouts: dict[str, tuple[Any, list[Any]]] = {}  # block -> (tree spec, meta leaves)
        self.slots: dict[str, tuple[list[Any], Any]] = {}
        self._placeholders: dict[str, Any] = {}

    def allocate(self, layouts: dict[str, tuple[Any, list[Any]]], read: set[str]) -> None:
        """New call signature: the layouts of every block's output; slots for the blocks this rank reads."""
        self.layouts, self.slots, self._placeholders = layouts, {}, {}
        for name in sorted(read):
            spec, leaves = layouts[name]
            self.slots[name] = ([empty_from_meta(x, self.device) for x in leaves], spec)

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def __bool__(self) -> bool:
        return bool(self.slots)

    def names(self) -> frozenset[str]:
        return frozenset(self.slots)

    def leaves(self, names: list[str]) -> list[torch.Tensor]:
        """The slot tensors of `names`, in order: what a receive writes into."""
        return [x for name in names for x in tensors(self.slots[name][0])]

    def replay(self, name: str) -> Any:
        """The stored output, as fresh tensors (glue may write in place), or a placeholder if not stored."""
        stored = self.slots.get(name)
        if stored is None:
            return self.placeholder(name)
        leaves, spec = stored
        return pytree.tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)

    def keep(self, fresh: dict[str, tuple[list[Any], Any]]) -> None:
        """Copy fresh outputs into their slots, in place."""
        for name, (leaves, _) in fresh.items():
            if name in self.slots:
                for dst, src in zip(self.slots[name][0], leaves):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src)

    def placeholder(self, name: str) -> Any:
        """Output of a block whose value this rank never reads: right layout for the glue, zeros."""
        if name not in self._placeholders:
            spec, leaves = self.layouts[name]
            real = [empty_from_meta(x, self.device) for x in leaves]
            for x in tensors(real):
                x.zero_()
            self._placeholders[name] = pytree.tree_unflatten(real, spec)
        return self._placeholders[name]
