"""A partition of the denoiser into segments: plain data that prints, saves, hashes and validates itself.

A plan lists, per segment, the qualified names of the denoiser modules that segment owns ("blocks"), in call
order. Everything not listed is replicated (docs/strategies.md). Plans come from the user (a list of lists, or a saved
JSON file) or from `asyncdiff_rt.plan_for` (measured costs).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import PlanError

__all__ = ["Plan", "Segment", "PlanError", "load_plan"]


@dataclass
class Segment:
    blocks: list[str]
    cost_ms: float | None = None  # measured compute of the owned blocks, if known
    bytes_in: int | None = None  # bytes this segment receives from other segments per step
    bytes_out: int | None = None  # bytes it sends to other segments per step
    weight_bytes: int | None = None  # parameters and buffers of its blocks (what its rank keeps of them)


@dataclass
class Plan:
    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)  # architecture, shape, dtype, device, how it was made

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, spec: Any) -> Plan:
        """Accept a Plan, a list of segments (each a list of module names), a JSON string or a file path."""
        if isinstance(spec, Plan):
            return spec
        if isinstance(spec, dict):
            return cls.from_json(json.dumps(spec))
        if isinstance(spec, (str, os.PathLike)):
            text = str(spec)
            if not text.lstrip().startswith("{") and not text.lstrip().startswith("["):
                if not os.path.exists(text):
                    raise PlanError(f"plan file {text!r} does not exist: pass a list of segments or a saved plan")
                with open(text) as f:
                    text = f.read()
            return cls.from_json(text)
        if isinstance(spec, (list, tuple)):
            segments = []
            for i, seg in enumerate(spec):
                if isinstance(seg, str) or not isinstance(seg, (list, tuple)):
                    raise PlanError(
                        f"plan segment {i} is {seg!r}; a plan is a list of segments, each a list of module names, "
                        "e.g. [['conv_in', 'down_blocks.0'], ['mid_block', 'up_blocks.0', 'conv_out']]"
                    )
                if not all(isinstance(name, str) for name in seg):
                    raise PlanError(f"plan segment {i} must hold module names (strings), got {seg!r}")
                segments.append(Segment(blocks=list(seg)))
            return cls(segments=segments)
        raise PlanError(f"cannot read a plan from {type(spec).__name__}: pass a list of segments or a saved plan")

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if isinstance(data, list):
            return cls.from_spec(data)
        if not isinstance(data, dict) or "segments" not in data:
            raise PlanError("a saved plan is a JSON object with a 'segments' list")
        segments = [Segment(**s) if isinstance(s, dict) else Segment(blocks=list(s)) for s in data["segments"]]
        return cls(segments=segments, meta=dict(data.get("meta", {})))

    # ----------------------------------------------------------------------------------------------- views
    @property
    def model_n(self) -> int:
        return len(self.segments)

    @property
    def blocks(self) -> list[str]:
        """All listed blocks in segment order (call order for plans the partitioner makes)."""
        return [b for s in self.segments for b in s.blocks]

    def owner(self) -> dict[str, int]:
        """Block name -> index of the segment that owns it."""
        return {b: i for i, s in enumerate(self.segments) for b in s.blocks}

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [asdict(s) for s in self.segments], "meta": self.meta}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    def hash(self) -> str:
        """Identity of the partition itself (the blocks per segment), not of the measured figures."""
        key = json.dumps([s.blocks for s in self.segments])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def split_quality(self) -> float | None:
        """sum / max of segment costs: n for a perfect split (MEASUREMENTS.md)."""
        costs = [s.cost_ms for s in self.segments]
        if any(c is None for c in costs) or not costs or max(costs) <= 0:
            return None
        return sum(costs) / max(costs)

    # ----------------------------------------------------------------------------------------------- checks
    def validate(self, denoiser: torch.nn.Module) -> None:
        """Raise PlanError for unknown modules, duplicates, a module listed with its parent, empty segments."""
        modules = dict(denoiser.named_modules())
        if self.model_n < 1:
            raise PlanError("a plan needs at least one segment")
        seen: dict[str, int] = {}
        for i, seg in enumerate(self.segments):
            if not seg.blocks:
                raise PlanError(f"plan segment {i} is empty: every segment must own at least one block")
            for name in seg.blocks:
                if name == "":
                    raise PlanError("the plan lists the whole denoiser ('') as a block: list its submodules")
                if name not in modules:
                    close = [m for m in modules if m and (m.endswith(name) or name.endswith(m))][:3]
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise PlanError(
                        f"plan names unknown module {name!r} of {type(denoiser).__name__}{hint}; "
                        "names are qualified as in denoiser.named_modules()"
                    )
                if name in seen:
                    raise PlanError(
                        f"plan lists module {name!r} twice (segments {seen[name]} and {i}): "
                        "every block belongs to exactly one segment"
                    )
                seen[name] = i
        for name in seen:
            parts = name.split(".")
            for j in range(1, len(parts)):
                parent = ".".join(parts[:j])
                if parent in seen:
                    raise PlanError(
                        f"plan lists both {parent!r} and its submodule {name!r}: list either the module or its "
                        "parts, not both"
                    )

    def describe(self) -> str:
        lines = [f"Plan: {self.model_n} segment(s), hash {self.hash()}"]
        for i, s in enumerate(self.segments):
            cost = f"{s.cost_ms:.3f} ms" if s.cost_ms is not None else "-"
            lines.append(f"  S{i}: {len(s.blocks)} block(s), {cost}: {', '.join(s.blocks)}")
        q = self.split_quality()
        if q is not None:
            lines.append(f"  split quality sum/max = {q:.3f} (ideal {self.model_n})")
        return "\n".join(lines)


def load_plan(path: str | os.PathLike) -> Plan:
    return Plan.from_spec(str(path))
