"""`bench --emulate N --strategy patch` without a GPU: the variant list, the bytes each rank sends against a hand
count from the layers' input shapes (2 gloo processes, tiny SDXL in float64), the transport sized before a graph
would bake its channels, the report's arithmetic and markdown from synthetic data, the bench dispatch, and the
whole orchestration on CPU processes (a stand-in daemon)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from spawn_cases import call_kwargs, pipe_of
from test_bench_emulate_cpu import StandIn

from asyncdiff_rt.strategies.patches import SYNC_MODES
from asyncdiff_rt.strategies.patches.exchange import PatchExchange
from asyncdiff_rt.strategies.patches.modes import StepPolicy
from asyncdiff_rt.tools import bench, emulate_patch
from asyncdiff_rt.tools.emulate_patch import patch_stem, patch_variants, steady_step_ms
from asyncdiff_rt.tools.emulate_patch_report import markdown, summarize
from asyncdiff_rt.transport.base import Transport


# ---------------------------------------------------------------------------------------------- variants
def test_patch_variants():
    got = [(v["name"], v["procs"], v["kind"]) for v in patch_variants(2, warm_up=3)]
    modes = [(f"patch_{m}", 2, "patch") for m in SYNC_MODES]
    assert got == [("one", 1, "segments"), ("control", 2, "segments"), *modes]
    assert "patch_naive" in [g[0] for g in got] and len(modes) == 7
    v = {s["name"]: s for s in patch_variants(4, warm_up=3, compare=True)}
    assert v["patch_sync_gn"]["sync_mode"] == "sync_gn" and v["patch_sync_gn"]["warm_up"] == 3
    assert v["one"]["independent"] and v["control"]["independent"] and not v["patch_no_sync"]["independent"]
    assert v["one"]["warm_up"] == 1 and v["control"]["procs"] == 4
    # --compare: the segments and CFG variants of `bench --emulate 4`, with their own settings
    assert v["ours_n3s2w1"]["stride"] == 2 and v["ours_n3s2w1"]["procs"] == 4
    assert v["cfg2_n2"]["cfg_parallel"] and v["cfg2_n2"]["model_n"] == 2 and v["cfg2_n2"]["kind"] == "segments"
    assert "ours_n4s1w1" not in {s["name"] for s in patch_variants(4)}
    for bad in (1, 5):
        with pytest.raises(ValueError):
            patch_variants(bad)


def test_stem_and_steady_steps():
    assert patch_stem("out", "tiny:sdxl", 64, "NVIDIA H200") == "out/emulated_patch_tiny_sdxl_64_NVIDIA_H200"
    assert steady_step_ms([100.0, 50.0, 10.0, 12.0], warm_up=2) == pytest.approx(11.0)
    assert steady_step_ms([100.0, 50.0], warm_up=2) is None


# ---------------------------------------------------------------------------------------------- bytes
def _bytes_worker(rank, world, mode):
    torch.set_num_threads(1)
    from asyncdiff_rt import PatchParallel

    pipe = pipe_of("sdxl")
    pp = PatchParallel(pipe, warm_up=1, sync_mode=mode, transport="gloo")
    with torch.no_grad():
        pipe(**call_kwargs(dict(kind="sdxl", size=64, steps=2)))
    out = pp.bytes_per_step()
    pp.remove()
    return out


def _hand_count(P: int = 2) -> dict:
    """From the input shapes of a plain run: rows, K/V and moments per layer, in float64 (8 bytes)."""
    from asyncdiff_rt.strategies.patches.checks import self_attentions

    pipe = pipe_of("sdxl")
    unet, seen = pipe.unet, []
    attn = {id(m) for _, m in self_attentions(unet)}

    def hook(module, args, kwargs):
        if "encoder_hidden_states" in kwargs and kwargs["encoder_hidden_states"] is not None:
            return  # cross-attention: local
        seen.append((module, tuple((args[0] if args else kwargs["hidden_states"]).shape)))

    for m in unet.modules():
        is_conv = isinstance(m, torch.nn.Conv2d) and m is not unet.conv_in and m.kernel_size[0] > 1
        if is_conv or isinstance(m, torch.nn.GroupNorm) or id(m) in attn:
            m.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        pipe(**call_kwargs(dict(kind="sdxl", size=64, steps=1)))
    row0 = row1 = kv = gn = 0
    for module, shape in seen:  # one step: one UNet call (both guidance halves in its batch)
        if isinstance(module, torch.nn.Conv2d):
            b, c, _, w = shape
            row = b * c * w * 8  # one input row of one patch
            row0 += row  # rank 0 sends its bottom `padding` (= 1) rows to rank 1
            row1 += row if module.stride[0] == 1 else 0  # rank 1 its top rows, which a stride-2 conv never reads
        elif isinstance(module, torch.nn.GroupNorm):
            gn += 2 * shape[0] * module.num_groups * 8
        else:
            b, tokens, _ = shape
            kv += 2 * b * (tokens // P) * module.to_k.out_features * 8
    return dict(row0=row0, row1=row1, kv=kv, gn=gn)


@pytest.mark.slow
def test_bytes_per_step_against_a_hand_count():
    from asyncdiff_rt.tools.launch import spawn

    torch.set_num_threads(1)
    hand = _hand_count()
    assert hand["row0"] > hand["row1"] > 0 and hand["kv"] > 0 and hand["gn"] > 0
    per_rank = spawn(_bytes_worker, 2, "corrected_async_gn", timeout_s=600)
    for rank, got in enumerate(per_rank):
        assert got["halo"] == hand["row0" if rank == 0 else "row1"], rank
        assert got["kv"] == hand["kv"] and got["gn"] == hand["gn"], rank
        # distrifuser: both boundaries of every 3x3 conv (2 rows: twice rank 0's one row), K/V and moments
        assert got["distrifusion"] == 2 * hand["row0"] + hand["kv"] + hand["gn"], rank
        assert got["output"] == 2 * 4 * 4 * 8 * 8  # batch 2 (CFG) x 4 channels x 4 of 8 latent rows x 8 x 8 bytes
        assert got["distrifusion"] < got["all_gather"]


class _Recorder(Transport):
    """A transport that records the byte sizes of what it is asked to prepare and to exchange."""

    name = "recorder"

    def broadcast(self, tensor, src, step):
        raise NotImplementedError

    def all_gather_object(self, obj, phase=None):
        raise NotImplementedError

    def __init__(self):
        self.prepared, self.exchanged = [], []

    @staticmethod
    def _sizes(d):
        return {q: [t.numel() * t.element_size() for t in ts] for q, ts in d.items()}

    def prepare(self, sends, recvs):
        self.prepared.append((self._sizes(sends), self._sizes(recvs)))

    def exchange(self, step, sends, recvs):
        self.exchanged.append((self._sizes(sends), self._sizes(recvs)))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_prepare_transport_announces_the_packed_exchange(rank):
    t = _Recorder()
    ex = PatchExchange(rank, 3, t, torch.device("cpu"), kv_groups=2)

    def forward(policy, fresh):
        ex.begin_step(policy)
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        ex.share(ex.point("conv"), {"top": x[..., :1, :], "bottom": x[..., -1:, :]}, fresh=fresh)
        ex.share(ex.point("attn"), {"kv": torch.randn(2, 2, 6, 8)}, fresh=fresh)  # K/V, batch, tokens, inner
        ex.share(ex.point("norm"), {"gn": torch.randn(2, 2, 4, dtype=torch.float64)}, fresh=fresh)
        ex.share(ex.point("attn"), {"kv": torch.randn(2, 2, 6, 8)}, fresh=fresh)  # its second call
        ex.end_step(torch.randn(2, 4, 3, 8))  # the output rows

    forward(StepPolicy("stale_gn", 1, 0), fresh=True)  # exact: registers and freezes
    steady = StepPolicy("stale_gn", 1, 1)
    ex.prepare_transport(steady.packed_regions)
    t.exchanged.clear()
    forward(steady, fresh=False)
    # the closing exchanges after the forward (rows + halos + moments, then K/V in two groups: Note [K/V groups]),
    # exactly as announced
    assert t.exchanged == t.prepared and len(t.prepared) == 3
    (sends, _), *kv_groups = t.prepared
    for kv_sends, _ in kv_groups:
        assert set(sends) == set(kv_sends) == {q for q in range(3) if q != rank}
        # each peer: this patch's K/V part of the group's one point, as its 2 x batch contiguous blocks of
        # (tokens, inner) (Note [kv slots])
        assert all(sizes == [6 * 8 * 4] * 4 for sizes in kv_sends.values())
    ex.prepare_transport(())
    assert t.exchanged == t.prepared  # nothing to announce without packed regions (no call recorded)


# ---------------------------------------------------------------------------------------------- report
def _row(what, median, procs, kind="patch", step=None, b=None, psnr=None, **extra):
    row = dict(what=what, kind=kind, procs=procs, model_n=1, stride=1, warm_up=5, cfg_parallel=False,
               sync_mode=None, median_s=median, min_s=median, max_s=median, times_s=[median], first_call_s=1.0,
               step_ms=step, peak_mem_gib=5.0)  # fmt: skip
    row.update(extra)
    if b is not None:
        row["bytes_per_rank"] = b
    if psnr is not None:
        row["fidelity"] = {"psnr_db": psnr, "max_abs": 0.1, "rel": 0.01}
    return row


def _bytes(halo, kv=100, gn=1, output=10, df=300):
    return {"halo": halo, "kv": kv, "gn": gn, "output": output, "all_gather": 10**6, "distrifusion": df}


def synthetic():
    variants = {
        "one": _row("alone", 10.0, 1, "segments", step=500.0, psnr=math.inf),
        "control": _row("side", 12.0, 2, "segments", step=600.0, medians_s=[11.0, 13.0], mean_s=12.0),
        "patch_corrected_async_gn": _row(
            "pp", 6.0, 2, step=300.0, b=[_bytes(20), _bytes(40)], psnr=35.0, captures=[0, 0]
        ),  # fmt: skip
        "patch_no_sync": _row(
            "pp", 5.0, 2, step=290.0, b=[_bytes(0, 0, 0), _bytes(0, 0, 0)], psnr=30.0, captures=[1, 1]
        ),  # fmt: skip
        "patch_naive": _row("pp", 4.0, 2, step=250.0, b=[_bytes(0, 0, 0, df=0)] * 2, psnr=12.0, captures=[1, 1]),
        "ours_n2s1w1": _row("seg", 5.5, 2, "segments", step=280.0, psnr=33.0),
        "cfg2": _row("cfg", 6.5, 2, "segments", step=310.0, psnr=60.0, cfg_parallel=True),
        "patch_sync_gn": {"error": "WorkerError: rank 1 died", "what": "pp"},
    }
    entry = dict(n=2, percent=50, steps=20, runs=1, warm_up=5, size=2048, date="2026-12-02", variants=variants)
    meta = {"model": "sdxl", "size": 2048, "device": "NVIDIA H200", "torch": "2.11", "diffusers": "0.42.1"}
    return {"meta": meta, "emulations": {"2": entry}}


def test_summarize_speedups_bytes_and_checks():
    e = summarize(synthetic())["emulations"]["2"]
    rows = e["variants"]
    c = rows["patch_corrected_async_gn"]
    assert c["vs_one"] == pytest.approx(10 / 6) and c["vs_control"] == pytest.approx(2.0)
    assert c["step_vs_control"] == pytest.approx(2.0)
    assert c["sent_bytes"] == 40 + 100 + 1 + 10  # the busiest rank (rank 1)
    assert e["distrifusion_bytes"] == 310 and e["distrifusion_from"] == "patch_corrected_async_gn"
    assert c["vs_distrifusion"] == pytest.approx(151 / 310)
    assert rows["patch_no_sync"]["sent_bytes"] == 10  # only the ε rows
    assert e["checks"]["corrected_vs_control"] == pytest.approx(2.0) and e["checks"]["target_vs_control"] == 1.85
    assert e["checks"]["corrected_step_over_no_sync"] == pytest.approx(300 / 290)
    assert e["best"] == {"patches": "patch_no_sync", "segments": "ours_n2s1w1", "CFG": "cfg2"}  # naive left out
    assert "vs_one" not in rows["patch_sync_gn"]


def test_markdown_from_synthetic_result():
    md = markdown(summarize(synthetic()))
    lines = md.splitlines()
    assert lines[0].startswith("# sdxl at 2048 px, 20 steps, PatchParallel — emulated: 2 processes on one GPU")
    assert "20 steps (fewer than a real run's 50" in md and "warm_up=5" in md
    row = next(x for x in lines if x.startswith("| patch_corrected_async_gn (emulated: 2 processes"))
    assert "| 6.000 | 1.67x | 2.00x | 300.0 | 2.00x | 0.0 / 0.0 / 0.0 / 0.0 | 0.49x | 35.0 | eager |" in row
    assert "| 1 graphs |" in next(x for x in lines if x.startswith("| patch_no_sync"))
    assert "| exact |" in next(x for x in lines if x.startswith("| one (emulated"))
    assert "failed: WorkerError: rank 1 died" in md
    assert "corrected_async_gn over the control: 2.00x (issue 17's target at 2048 px: >= 1.85x, met" in md
    assert "corrected_async_gn step / no_sync step: 1.034 (target <= 1.05, met)" in md
    assert "## Segments vs patches vs CFG: the fastest of each at 2048 px, N = 2" in md
    assert "| patches | patch_no_sync | 5.000 | 2.40x |" in md and "| CFG | cfg2 | 6.500 |" in md


def test_targets_of_non_finite_latents_are_not_counted():
    data = synthetic()
    data["emulations"]["2"]["variants"]["patch_corrected_async_gn"]["fidelity"]["psnr_db"] = math.nan
    md = markdown(summarize(data))
    assert summarize(synthetic())["emulations"]["2"]["checks"]["corrected_finite"] is True
    assert "2.00x (issue 17's target at 2048 px: >= 1.85x, NOT counted: its latents are not finite)" in md
    assert "1.034 (target <= 1.05, NOT counted: its latents are not finite)" in md


def test_bench_dispatches_patch(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(emulate_patch, "run_patch_emulation", lambda *a, **k: got.update(args=a, kwargs=k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("the parent asked CUDA"))
    argv = ["--model", "sdxl", "--emulate", "4", "--strategy", "patch", "--size", "2048", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert got["args"] == ("sdxl", 4, 2048, 20, 1, str(tmp_path))
    assert got["kwargs"]["compare"] is False and got["kwargs"]["warm_up"] == 5
    assert bench.main([*argv[:6], "--compare", "--steps", "12", "--runs", "2", "--warm_up", "3"]) == 0
    assert got["args"][:5] == ("sdxl", 4, 1024, 12, 2) and got["kwargs"]["compare"] and got["kwargs"]["warm_up"] == 3
    with pytest.raises(SystemExit):
        bench.main(["--model", "sdxl", "--strategy", "patch"])  # only emulated


# ---------------------------------------------------------------------------------------------- orchestration
@pytest.mark.slow
def test_patch_orchestration_on_cpu_processes(tmp_path):
    only = ["one", "patch_corrected_async_gn", "patch_naive"]
    kw = dict(steps=2, runs=1, out=str(tmp_path), device="cpu", warm_up=1, only=only)
    emulate_patch.run_patch_emulation("tiny:sdxl", 2, 64, daemon=StandIn(), **kw)
    stem = tmp_path / "emulated_patch_tiny_sdxl_64_cpu"
    entry = json.loads(stem.with_suffix(".json").read_text())["emulations"]["2"]
    assert list(entry["variants"]) == only and entry["size"] == 64 and entry["warm_up"] == 1
    rows = entry["variants"]
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["step_ms"] > 0 and r["vs_one"] > 0, name
    assert math.isinf(rows["one"]["fidelity"]["psnr_db"])
    corrected, naive = rows["patch_corrected_async_gn"], rows["patch_naive"]
    assert naive["fidelity"]["psnr_db"] < corrected["fidelity"]["psnr_db"] < math.inf  # naive: patches never meet
    assert len(corrected["bytes_per_rank"]) == 2 and 0 < corrected["vs_distrifusion"] < 1
    assert corrected["captures"] == [0, 0]  # CPU: eager
    md = stem.with_suffix(".md").read_text()
    assert "| patch_naive (emulated: 2 processes" in md
    # a rerun with the same settings keeps what was measured (resumable): nothing is spawned
    monkey = pytest.MonkeyPatch()
    monkey.setattr(emulate_patch.emulate, "_spawn", _no_spawn_but_device)
    try:
        emulate_patch.run_patch_emulation("tiny:sdxl", 2, 64, daemon=StandIn(), **kw)
    finally:
        monkey.undo()
    again = json.loads(stem.with_suffix(".json").read_text())["emulations"]["2"]["variants"]
    assert again["patch_naive"]["median_s"] == naive["median_s"]


def _no_spawn_but_device(fn, procs, spec, env, timeout_s):
    if spec["name"] != "device":
        pytest.fail(f"{spec['name']} was measured again")
    return [{"device": "cpu", "torch": torch.__version__, "diffusers": "x"}]
