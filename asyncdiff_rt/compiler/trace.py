"""One forward of the denoiser, recording the call order of its blocks and the data flow between them.

How it works: forward hooks mark where each block starts and ends; a ``TorchDispatchMode`` sees every aten op
and propagates *labels* per storage. A label is ``(block, leaf)``: "derives from leaf ``leaf`` of ``block``'s
output" (``"<input>"`` stands for the denoiser's inputs). Rules:

* glue (ops outside any block): a fresh result carries the union of its inputs' labels; an op that writes in place
  (``sample += residual``, ``out=``, ``copy_`` into a slice) adds its inputs' labels to the written storage.
  Views share their base's storage, hence its labels — which makes in-place writes through views visible too.
* inside block B every op's result is labelled ``(B, INTERNAL)``; reading a storage that carries another block's
  label records a dependency of B on that block's leaf (so tensors a block reads without receiving them as
  arguments count too).
* when B returns, each output leaf's storage is relabelled ``(B, i)``: a block's outputs derive only from that
  block. Skip connections (res_samples tuples sliced by the up blocks) are plain Python references to those
  storages, so they keep their labels until ``torch.cat`` in the up block's glue joins them.
* the denoiser's return value: its leaves' labels give the edges ``src -> "<output>"``.

Labels are per storage, not per tensor, so the result is a superset when one storage holds parts from different
sources (never a missed edge: an extra edge costs a transfer, a missed one a wrong image).

Device: the trace runs on whatever device the denoiser and inputs are. ``meta_twin(denoiser)`` builds a copy on
the ``meta`` device from the model's config (no memory, no compute), so the real SDXL-1024 architecture traces in
about a second on a CPU; tiny models can be traced with real tensors. Tests check both give the same edges.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import TraceError
from .blocks import check_no_nesting

__all__ = ["Trace", "Edge", "BlockRecord", "LeafInfo", "TraceError", "trace_denoiser", "meta_twin", "INPUT", "OUTPUT"]

INPUT = "<input>"
OUTPUT = "<output>"
INTERNAL = -1  # leaf index of a tensor a block created but did not return (read later only if the block leaks it)


@dataclass
class LeafInfo:
    shape: list[int]
    dtype: str
    nbytes: int


@dataclass
class BlockRecord:
    name: str
    calls: int = 0
    outputs: list[LeafInfo | None] = field(default_factory=list)  # pytree leaves of the output; None: not a tensor
    structure: str = ""  # the output's pytree spec, printed

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.outputs if leaf is not None)


@dataclass
class Edge:
    src: str  # a block or "<input>"
    dst: str  # a block or "<output>"
    nbytes: int  # bytes of src's output leaves that dst depends on (what crosses if they live apart)
    shapes: list[list[int]]
    dtypes: list[str]
    leaves: list[int]  # indices into src's output leaves; INTERNAL (-1) when dst reads a tensor src leaked


@dataclass
class Trace:
    order: list[str]  # blocks in first-call order
    blocks: dict[str, BlockRecord]
    edges: list[Edge]
    inputs: list[LeafInfo | None] = field(default_factory=list)  # leaves of (args, kwargs)
    output: list[LeafInfo | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ queries
    def consumers(self, block: str) -> set[str]:
        """Blocks (and "<output>") that read ``block``'s output."""
        return {e.dst for e in self.edges if e.src == block}

    def producers(self, block: str) -> set[str]:
        """Blocks whose output ``block`` (or "<output>") reads; "<input>" excluded."""
        return {e.src for e in self.edges if e.dst == block and e.src != INPUT}

    def output_sources(self) -> set[str]:
        return self.producers(OUTPUT)

    def needed_by(self, owned_blocks: set[str] | list[str], owns_output: bool | None = None) -> set[str]:
        """Non-owned blocks whose outputs the owned blocks read — and, when this set owns the output (by default:
        when it owns one of the output's source blocks), those the denoiser's return value reads."""
        owned = set(owned_blocks)
        if owns_output is None:
            owns_output = bool(owned & self.output_sources())
        readers = set(owned) | ({OUTPUT} if owns_output else set())
        return {e.src for e in self.edges if e.dst in readers and e.src not in owned and e.src != INPUT}

    def edge(self, src: str, dst: str) -> Edge | None:
        for e in self.edges:
            if e.src == src and e.dst == dst:
                return e
        return None

    def block_edges(self) -> list[Edge]:
        """Edges between two blocks (no "<input>", no "<output>")."""
        return [e for e in self.edges if e.src != INPUT and e.dst != OUTPUT]

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "order": list(self.order),
            "blocks": {k: asdict(v) for k, v in self.blocks.items()},
            "edges": [asdict(e) for e in self.edges],
            "inputs": [asdict(x) if x is not None else None for x in self.inputs],
            "output": [asdict(x) if x is not None else None for x in self.output],
            "warnings": list(self.warnings),
            "meta": dict(self.meta),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        def leaf(x):
            return LeafInfo(**x) if x is not None else None

        blocks = {
            k: BlockRecord(
                name=v["name"], calls=v["calls"], outputs=[leaf(x) for x in v["outputs"]], structure=v["structure"]
            )
            for k, v in data["blocks"].items()
        }
        return cls(
            order=list(data["order"]),
            blocks=blocks,
            edges=[Edge(**e) for e in data["edges"]],
            inputs=[leaf(x) for x in data.get("inputs", [])],
            output=[leaf(x) for x in data.get("output", [])],
            warnings=list(data.get("warnings", [])),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Trace:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        return (
            f"Trace: {len(self.order)} blocks, {len(self.block_edges())} block edges, "
            f"output from {sorted(self.output_sources())}"
            + (f", {len(self.warnings)} warning(s)" if self.warnings else "")
        )


# ---------------------------------------------------------------------------------------------------- tracing
def _leaf_info(x: Any) -> LeafInfo | None:
    if not isinstance(x, torch.Tensor):
        return None
    return LeafInfo(shape=list(x.shape), dtype=str(x.dtype).replace("torch.", ""), nbytes=x.numel() * x.element_size())


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensors without storage (rare subclasses): fall back to the object itself
        return id(t)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


class _Tracer(TorchDispatchMode):
    def __init__(self, blocks: list[str]):
        super().__init__()
        self.block_set = set(blocks)
        self.labels: dict[int, frozenset] = {}  # storage key -> {(source, leaf)}
        self.current: str | None = None
        self.order: list[str] = []
        self.records: dict[str, BlockRecord] = {}
        self.reads: dict[tuple[str, str], set[int]] = {}  # (src, dst) -> leaves of src
        self.warnings: list[str] = []
        self._warned: set[tuple[str, str]] = set()

    def warn(self, kind: str, block: str, text: str) -> None:
        if (kind, block) not in self._warned:
            self._warned.add((kind, block))
            self.warnings.append(text)

    # a block's reads of other blocks' (or the inputs') data
    def _record_reads(self, dst: str, labels: frozenset) -> None:
        for src, leaf in labels:
            if src == dst:
                continue
            self.reads.setdefault((src, dst), set()).add(leaf)
            if leaf == INTERNAL:
                self.warn(
                    "leak", f"{src}->{dst}", f"{dst} reads a tensor {src} created but did not return (hidden state)"
                )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        in_keys = {_storage_key(t) for t in inputs}
        in_labels: frozenset = frozenset().union(*(self.labels.get(k, frozenset()) for k in in_keys))
        block = self.current
        if block is not None:
            self._record_reads(block, in_labels)
            new = frozenset({(block, INTERNAL)})
        else:
            new = in_labels
        schema = func._schema
        if schema.is_mutable:
            for i, a in enumerate(schema.arguments):
                if a.alias_info is None or not a.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
                for t in _tensors(value):
                    key = _storage_key(t)
                    old = self.labels.get(key, frozenset())
                    if block is not None and (block, INTERNAL) not in old and old:
                        self.warn("inplace", block, f"{block} writes in place into a tensor it did not create")
                    self.labels[key] = old | new
        for t in _tensors(out):
            key = _storage_key(t)
            if key not in in_keys:  # a fresh result (views and in-place results share an input's storage)
                self.labels[key] = new
        return out

    # hooks
    def pre_hook(self, name: str):
        def hook(module, args, kwargs):
            if self.current is not None:
                raise TraceError(
                    f"block {name!r} was called inside block {self.current!r}: blocks must not nest "
                    "(list a module or its parts, not both)"
                )
            self.current = name
            rec = self.records.get(name)
            if rec is None:
                rec = self.records[name] = BlockRecord(name=name)
                self.order.append(name)
            rec.calls += 1
            if rec.calls == 2:
                self.warn("calls", name, f"{name} is called more than once per forward")

        return hook

    def post_hook(self, name: str):
        def hook(module, args, kwargs, output):
            self.current = None
            leaves, spec = pytree.tree_flatten(output)
            rec = self.records[name]
            if rec.calls == 1:
                rec.outputs = [_leaf_info(x) for x in leaves]
                rec.structure = str(spec)
            relabel: dict[int, set] = {}
            for i, x in enumerate(leaves):
                if not isinstance(x, torch.Tensor):
                    continue
                key = _storage_key(x)
                old = self.labels.get(key, frozenset())
                if (name, INTERNAL) not in old and key not in relabel:
                    # the block hands back (a view of) a tensor it did not create: it still carries that data
                    self.warn("alias", name, f"{name} returns a tensor it did not create (output aliases input)")
                    relabel[key] = set(old)
                relabel.setdefault(key, set()).add((name, i))
            for key, labels in relabel.items():
                self.labels[key] = frozenset(labels)

        return hook


def trace_denoiser(denoiser: nn.Module, args: tuple = (), kwargs: dict | None = None, blocks: list[str] = ()) -> Trace:
    """Run ``denoiser(*args, **kwargs)`` once (under no_grad) and record the blocks' order and data flow."""
    kwargs = dict(kwargs or {})
    blocks = list(blocks)
    check_no_nesting(blocks)
    modules = dict(denoiser.named_modules())
    missing = [b for b in blocks if b not in modules]
    if missing:
        raise TraceError(f"{type(denoiser).__name__} has no module(s) {missing[:5]}")
    tracer = _Tracer(blocks)
    in_leaves = pytree.tree_leaves((args, kwargs))
    for i, x in enumerate(in_leaves):
        if isinstance(x, torch.Tensor):
            key = _storage_key(x)
            tracer.labels[key] = tracer.labels.get(key, frozenset()) | {(INPUT, i)}
    handles = []
    try:
        for b in blocks:
            m = modules[b]
            handles.append(m.register_forward_pre_hook(tracer.pre_hook(b), with_kwargs=True))
            handles.append(m.register_forward_hook(tracer.post_hook(b), with_kwargs=True))
        on_meta = any(isinstance(x, torch.Tensor) and x.is_meta for x in in_leaves)
        # on meta, tensors the forward makes without naming a device (SVD's AlphaBlender) must be meta too
        device_ctx = torch.device("meta") if on_meta else contextlib.nullcontext()
        with torch.no_grad(), device_ctx, tracer:
            try:
                output = denoiser(*args, **kwargs)
            except TraceError:
                raise
            except Exception as exc:
                raise TraceError(
                    f"tracing {type(denoiser).__name__} failed: {type(exc).__name__}: {exc}"
                    + (
                        " (on the meta device: an op without a meta kernel or a data-dependent branch)"
                        if on_meta
                        else ""
                    )
                ) from exc
    finally:
        for h in handles:
            h.remove()
    out_leaves = pytree.tree_leaves(output)
    for x in out_leaves:
        if isinstance(x, torch.Tensor):
            tracer._record_reads(OUTPUT, tracer.labels.get(_storage_key(x), frozenset()))
    never = [b for b in blocks if b not in tracer.records]
    if never:
        tracer.warnings.append(f"{len(never)} listed block(s) never called: {never[:5]}")

    input_info = [_leaf_info(x) for x in in_leaves]
    edges = []
    for (src, dst), leaves in tracer.reads.items():
        infos = input_info if src == INPUT else tracer.records[src].outputs
        ls = sorted(leaves)
        picked = [infos[i] for i in ls if 0 <= i < len(infos) and infos[i] is not None]
        edges.append(
            Edge(
                src=src,
                dst=dst,
                nbytes=sum(p.nbytes for p in picked),
                shapes=[p.shape for p in picked],
                dtypes=[p.dtype for p in picked],
                leaves=ls,
            )
        )
    position = {b: i for i, b in enumerate(tracer.order)}
    position[INPUT], position[OUTPUT] = -1, len(position)
    edges.sort(key=lambda e: (position[e.src], position[e.dst]))
    device = next((x.device for x in in_leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
    return Trace(
        order=tracer.order,
        blocks=tracer.records,
        edges=edges,
        inputs=input_info,
        output=[_leaf_info(x) for x in out_leaves],
        warnings=tracer.warnings,
        meta={"denoiser": type(denoiser).__name__, "device": device.type},
    )


def meta_twin(denoiser: nn.Module) -> nn.Module:
    """A copy of ``denoiser`` on the meta device (same module tree, no weights in memory).

    diffusers models are rebuilt from their config under ``torch.device("meta")``; other modules are deep-copied
    with their parameters swapped for meta tensors first, so nothing of size is ever copied.
    """
    parts = getattr(denoiser, "composite_parts", None)  # ControlNet + UNet: a twin of each part
    if parts:
        return type(denoiser)(*(meta_twin(getattr(denoiser, p)) for p in parts)).eval()
    config = getattr(denoiser, "config", None)
    from_config = getattr(type(denoiser), "from_config", None)
    if config is not None and from_config is not None:
        try:
            with torch.device("meta"):
                twin = from_config(dict(config))
            names = {n for n, _ in denoiser.named_modules()}
            if names <= {n for n, _ in twin.named_modules()}:
                _match_tensors(twin, denoiser)
                return twin.eval()
        except Exception:
            pass
    memo = {}
    for t in list(denoiser.parameters()) + list(denoiser.buffers()):
        memo[id(t)] = (
            nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else torch.empty_like(t, device="meta")
        )
    return copy.deepcopy(denoiser, memo).eval()


def _match_tensors(twin: nn.Module, original: nn.Module) -> None:
    """Every parameter and buffer of ``twin`` on meta, with the original's shape and dtype where it has one (some
    diffusers modules build tensors with ``torch.Tensor([...])``, which ignores the device context)."""
    ref = dict(original.named_parameters())
    ref.update(original.named_buffers())
    for mod_name, module in twin.named_modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                src = ref.get(f"{mod_name}.{name}" if mod_name else name, t)
                new = torch.empty_like(src, device="meta")
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
