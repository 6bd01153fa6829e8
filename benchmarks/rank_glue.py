"""Where each segments rank's compute goes beyond its own blocks (issue 16's remaining gap), on ONE GPU.

The emulated tables show every rank computing more per round than the plan's segment cost, the rank that makes ε
most. This splits one rank's round into what its kernels run inside: its owned blocks, the snapshots of the
outputs it sends, the replays of the outputs it receives (copies out of the static store), and the replicated glue
between blocks, the glue broken down by operator. All ranks run in one process (transport "local": each rank's
view in turn, exactly the forward each process of a real run issues, dead tail included), eagerly, under
torch.profiler; kernel durations are GPU times (no launch gaps), summed per rank over the profiled call's rounds.

    python benchmarks/rank_glue.py --model sd21 --n 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import asyncdiff_rt  # noqa: E402
from asyncdiff_rt.strategies.segments import stepper as stepper_mod  # noqa: E402
from asyncdiff_rt.tools.bench_setup import bench_pipeline  # noqa: E402
from asyncdiff_rt.tools.emulate import write_results  # noqa: E402

CATEGORIES = ("owned", "snapshot", "replay")


def _instrument() -> None:
    """Mark each rank's forward and, inside it, every block call as owned or replayed (the snapshot of a sent
    output is taken inside the owned call's wrapper, after the block: marked apart)."""
    block_forward, run = stepper_mod.SegmentStepper.block_forward, stepper_mod.SegmentStepper._run
    snapshot = stepper_mod._snapshot

    def marked_block_forward(self, name, original):
        inner = block_forward(self, name, original)

        def forward(*args, **kwargs):
            view = self._view
            kind = "owned" if view is None or name in view.owned else "replay"
            with record_function(f"cat:{kind}"):
                return inner(*args, **kwargs)

        return forward

    def marked_run(self, original, view, recording, args, kwargs, exit_after=None):
        with record_function(f"view:{view.rank if view is not None else 'all'}"):
            return run(self, original, view, recording, args, kwargs, exit_after)

    def marked_snapshot(output):
        with record_function("cat:snapshot"):
            return snapshot(output)

    stepper_mod.SegmentStepper.block_forward = marked_block_forward
    stepper_mod.SegmentStepper._run = marked_run
    stepper_mod._snapshot = marked_snapshot


def attribute(events, cuda: bool) -> dict[str, dict]:
    """Per rank view: µs by category, glue µs by operator, and the number of forwards seen. On a GPU the time of
    an operator is that of the kernels it launched; on a CPU (a smoke test) its self CPU time."""
    out: dict[str, dict] = {}

    def walk(event, view: dict, category: str | None) -> None:
        if event.name.startswith("cat:"):
            category = event.name[4:]  # the innermost mark wins: a snapshot inside an owned call is a snapshot
        us = sum(k.duration for k in event.kernels) if cuda else event.self_cpu_time_total
        if us and not event.name.startswith(("view:", "cat:")):  # a mark's own (host) time is not an operator's
            if category is None:
                view["glue"] += us
                view["glue_ops"][event.name] += us
            else:
                view[category] += us
        for child in event.cpu_children:
            walk(child, view, category)

    for event in events:
        if event.name.startswith("view:") and not _inside_view(event):
            empty = {"forwards": 0, "glue": 0.0, "glue_ops": collections.Counter(), **dict.fromkeys(CATEGORIES, 0.0)}
            view = out.setdefault(event.name[5:], empty)
            view["forwards"] += 1
            walk(event, view, None)
    return out


def _inside_view(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("view:"):
            return True
        parent = parent.cpu_parent
    return False


def markdown(result: dict) -> str:
    lines = [
        f"# Where each rank's round goes: {result['model']}, segments n={result['n']}, on one {result['device']} "
        "(not emulated)",
        "",
        f"torch {result['torch']}, {result['date']}. One process runs every rank's forward in turn (transport "
        "local, eager, dead tail as in a real run) under torch.profiler; kernel GPU time per round, by what the "
        "kernels run inside. The plan's segment costs (ms): "
        + " / ".join(f"{c:.1f}" for c in result["plan_segment_ms"]),
        "",
        "| rank | owned blocks (ms) | snapshots (ms) | replays (ms) | glue (ms) | total (ms) "
        "| largest glue operators (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["ranks"]:
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in r["top_glue_ms"][:5])
        lines.append(
            f"| {r['rank']} | {r['owned_ms']:.2f} | {r['snapshot_ms']:.2f} | {r['replay_ms']:.2f} | {r['glue_ms']:.2f} "
            f"| {r['total_ms']:.2f} | {top} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd21")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="steps per call (W=1: steps - 1 rounds profiled)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test on a tiny model (CPU times, no meaning)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("rank_glue.py: no CUDA GPU here (kernel times need one; --device cpu for a smoke test)")
    _instrument()
    pipe, kwargs = bench_pipeline(args.model, args.device, args.steps)
    ad = asyncdiff_rt.AsyncDiff(pipe, model_n=args.n, warm_up=1, transport="local", graphs=False)
    call = lambda: pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))  # noqa: E731
    call()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        sync()
    views = attribute(prof.events(), cuda)
    plan_ms = [seg.cost_ms for seg in ad.plan.segments]
    rows = []
    for name in sorted(views, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0)):
        view = views[name]
        rounds = max(view["forwards"], 1)
        per = {c: view[c] / rounds / 1e3 for c in (*CATEGORIES, "glue")}
        top = [(op, us / rounds / 1e3) for op, us in view["glue_ops"].most_common(8)]
        rows.append({"rank": name, "forwards": view["forwards"], **{f"{c}_ms": v for c, v in per.items()},
                     "total_ms": sum(per.values()), "top_glue_ms": top})  # fmt: skip
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    result = {
        "model": args.model, "n": args.n, "device": device, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "plan_segment_ms": plan_ms, "ranks": rows,
    }  # fmt: skip
    stem = os.path.join(args.out, f"rank_glue_{args.model}_n{args.n}_{device.replace(' ', '_')}")
    os.makedirs(args.out, exist_ok=True)
    write_results(stem, result, markdown)
    print(markdown(result))
    ad.remove()


if __name__ == "__main__":
    main()
