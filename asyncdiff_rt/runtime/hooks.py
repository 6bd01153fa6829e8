"""Installing and removing our hooks without forking diffusers: forward overrides on modules, and a call hook
on the pipeline.

`pipe(...)` looks `__call__` up on the class, so patching the instance does nothing; instead the instance is
moved to a subclass of its own class (same name) whose `__call__` brackets the original. `remove` restores the
class, so the user's pipeline object is what it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ForwardOverrides", "CallHook"]


class ForwardOverrides:
    """Instance-level `forward` replacements, restored exactly by `remove()`."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.nn.Module, Any]] = []

    def install(self, module: torch.nn.Module, make: Callable[[Callable], Callable]) -> None:
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    def remove(self) -> None:
        for module, old in reversed(self._saved):
            if old is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old
        self._saved.clear()


class CallHook:
    """Runs `before(kwargs) -> kwargs` and `after(ok)` around every call of the pipeline object."""

    def __init__(
        self,
        pipe: Any,
        before: Callable[[dict], dict],
        after: Callable[[bool], None],
        flag: str = "_asyncdiff_rt_hooked",
    ):
        base = type(pipe)
        if getattr(base, flag, False):
            raise RuntimeError(
                "this pipeline already has an AsyncDiff attached: call .remove() on it before attaching another"
            )
        original = base.__call__

        def __call__(self_, *args: Any, **kwargs: Any) -> Any:
            kwargs = before(kwargs)
            ok = False
            try:
                result = original(self_, *args, **kwargs)
                ok = True
            finally:
                after(ok)
            return result

        self.pipe, self.base = pipe, base
        self.cls = type(
            base.__name__,
            (base,),
            {"__call__": __call__, flag: True, "__module__": base.__module__},
        )
        self.cls.__qualname__ = base.__qualname__
        pipe.__class__ = self.cls

    def remove(self) -> None:
        if self.pipe is not None and self.pipe.__class__ is self.cls:
            self.pipe.__class__ = self.base
        self.pipe = None
