"""`local`: one process runs every segment (a test vehicle; on a GPU, segments on streams of one device)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Transport

__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    """A world of one: the runtime runs every rank view itself and hands outputs over in memory."""

    name = "local"

    def exchange(self, step: int, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]]) -> None:
        if sends or recvs:
            raise RuntimeError("the local transport has no peers")

    def broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        pass

    def all_gather_object(self, obj: Any, phase: str | None = None) -> list[Any]:
        return [obj]
