"""Displaced patch parallelism (DESIGN §10): each rank computes a band of rows of every feature map."""

from .modes import SYNC_MODES
from .parallel import PatchParallel

__all__ = ["PatchParallel", "SYNC_MODES"]
