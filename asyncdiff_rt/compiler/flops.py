"""Block costs without timing: FLOPs per block counted in one forward of a ``meta`` twin of the denoiser.

Why: timing every block for real (cost.py) needs the real architecture in memory and minutes of compute; on a CPU
that is 10+ GB and 10+ minutes for SDXL, and the CPU's figures do not predict a GPU's anyway. Counting FLOPs on
the meta device costs neither memory nor compute (seconds for SDXL) and ranks blocks the way a GPU runs them when
the matrix multiplies, convolutions and attention dominate, as they do in UNets and DiTs at the sizes people use.
What it misses: memory-bound work (norms, element-wise ops, copies) counts as zero, and so does launch overhead.

The partition only compares costs, so the unit does not change the plan; we report each block as milliseconds at
a nominal ``NOMINAL_TFLOPS`` so the plan table's "ms" column stays comparable in size with measured plans. The
counts themselves are in the plan's meta (``block_gflop``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .cost import BlockCosts, device_name
from .trace import meta_twin

__all__ = ["NOMINAL_TFLOPS", "count_block_flops", "flop_block_costs"]

# A dense fp16 throughput of the order a current data-centre GPU sustains on these models; only a scale.
NOMINAL_TFLOPS = 100.0


def _to_meta(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, tree)


def count_block_flops(denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str]) -> tuple[dict, int]:
    """FLOPs of each block of ``blocks`` (summed over its calls) and of the whole forward, on a meta twin."""
    twin = denoiser if _on_meta(denoiser) else meta_twin(denoiser)
    margs, mkwargs = _to_meta((tuple(args), dict(kwargs or {})))
    modules = dict(twin.named_modules())
    counter = FlopCounterMode(display=False)
    flops = dict.fromkeys(blocks, 0)
    open_at: dict[str, list[int]] = {}
    handles = []

    # The counter's running total at a block's entry and exit: the difference is what the block did. A stack per
    # block, so a block called again from inside itself (none we know of) still counts once per call.
    def pre(name):
        def hook(module, a):
            open_at.setdefault(name, []).append(counter.get_total_flops())

        return hook

    def post(name):
        def hook(module, a, out):
            flops[name] += counter.get_total_flops() - open_at[name].pop()

        return hook

    try:
        for b in blocks:
            handles.append(modules[b].register_forward_pre_hook(pre(b)))
            handles.append(modules[b].register_forward_hook(post(b)))
        # tensors the forward makes without naming a device must be meta too (as in trace.py)
        with torch.no_grad(), torch.device("meta"), counter:
            twin(*margs, **mkwargs)
    finally:
        for h in handles:
            h.remove()
    return flops, counter.get_total_flops()


def _on_meta(module: nn.Module) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.is_meta


def flop_block_costs(
    denoiser: nn.Module, args: tuple, kwargs: dict, blocks: list[str], device: torch.device | str | None = None
) -> BlockCosts:
    """``BlockCosts`` from FLOP counts: block -> ms at ``NOMINAL_TFLOPS`` (mode "flops", never cached: it is
    cheaper to count again than to hash the architecture). ``.gflop`` holds the counts."""
    flops, total = count_block_flops(denoiser, args, kwargs, blocks)
    per_ms = NOMINAL_TFLOPS * 1e9  # FLOPs per millisecond
    costs = BlockCosts(
        {b: f / per_ms for b, f in flops.items()},
        denoiser_ms=None,  # nothing was measured; the plan table would call it "measured"
        from_cache=False,
        device_name=device_name(device) if device is not None and torch.device(device).type != "meta" else "meta",
        mode="flops",
        modes={b: "flops" for b in blocks},
    )
    costs.gflop = {b: f / 1e9 for b, f in flops.items()}
    costs.total_gflop = total / 1e9
    return costs
