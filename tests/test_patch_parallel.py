"""PatchParallel (asyncdiff_rt/strategies/patches/): displaced patch parallelism over processes, on CPU.

Float64 tiny pipelines (tests/patch_cases.py), one spawn per world size running every case: over gloo with 2
processes every sync mode equals the single-process definition, `asyncdiff_rt.simulate(strategy="patch")`, on
SD 1.5 (128 px: 16 latent rows = 2 x 2^3) and SDXL (64 px: 8 = 2 x 2^2), while the stale modes are far from plain
diffusers; `full_sync` and warm_up >= steps equal plain diffusers; P=3 (SDXL 96 px), shm, two calls in a row, a dead
peer, cfg_parallel (4 processes: 2 patches x 2 guidance halves), SDXL + ControlNet (the ControlNet split into the
same patches), and bad input refused alike on every rank (or before any communication, in this process).
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from patch_cases import pipe_of, plain, run_cases, simulated
from spawn_cases import WorldResults, ok

from asyncdiff_rt import ConfigError, PatchParallel
from asyncdiff_rt.strategies.patches import SYNC_MODES
from asyncdiff_rt.strategies.patches.exchange import KV_GROUPS_ENV
from asyncdiff_rt.tools.launch import WorkerError, spawn
from asyncdiff_rt.transport.pieces import SLOT_ENV
from asyncdiff_rt.transport.windows import PUTS_ENV

TIGHT = 1e-8  # float64: runtime and simulator differ by summation order only (~1e-13)
FAR = 1e-3  # stale values move the latents far more than that
STALE = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "no_sync", "naive")
SIZES = {"sd15": 128, "sdxl": 64}
CONTROLNET_MODES = ("corrected_async_gn", "sync_gn", "full_sync")

CASES_2 = {
    **{f"{k}_{m}": dict(kind=k, size=SIZES[k], sync_mode=m, steps=3, warm_up=1) for k in SIZES for m in SYNC_MODES},
    "sd15_exact_warm_up": dict(kind="sd15", size=128, sync_mode="corrected_async_gn", steps=3, warm_up=3),
    "sd15_two_calls": dict(kind="sd15", size=128, sync_mode="corrected_async_gn", steps=3, warm_up=1, calls=2),
    "sd15_shm": dict(kind="sd15", size=128, sync_mode="stale_gn", steps=3, warm_up=1, transport="shm"),
    # warm_up=2: the registering step's K/V are dropped before the window is made (the next step rewrites them)
    "sd15_shm_w2": dict(kind="sd15", size=128, sync_mode="corrected_async_gn", steps=4, warm_up=2, transport="shm"),
    "sd15_shm_slots": dict(
        kind="sd15", size=128, sync_mode="stale_gn", steps=3, warm_up=1, transport="shm", env={PUTS_ENV: "0"}
    ),
    **{
        f"sdxl_controlnet_{m}": dict(kind="sdxl_controlnet", size=64, sync_mode=m, steps=3, warm_up=1)
        for m in CONTROLNET_MODES
    },
    "bad_height": dict(kind="sd15", size=64),
    "bad_disagree": dict(kind="sd15", size=128, rank_mode=["corrected_async_gn", "stale_gn"]),
    "bad_world": dict(kind="sd15", size=128, patches=3),
}
CASES_3 = {
    f"sdxl_p3_{m}": dict(kind="sdxl", size=96, sync_mode=m, steps=3, warm_up=1)
    for m in ("corrected_async_gn", "full_sync")
} | {  # 64 KiB slots: every K/V message travels in pieces (transport/shm.py, Note [slot cap]), K/V in groups
    "sdxl_p3_shm_pieces": dict(
        kind="sdxl", size=96, sync_mode="corrected_async_gn", steps=3, warm_up=1, transport="shm",
        env={SLOT_ENV: "0.0625", KV_GROUPS_ENV: "4", PUTS_ENV: "0"},
    ),
    # K/V as puts into both peers' windows, in groups (exchange.py, Note [K/V puts])
    "sdxl_p3_shm_puts": dict(
        kind="sdxl", size=96, sync_mode="corrected_async_gn", steps=3, warm_up=1, transport="shm",
        env={KV_GROUPS_ENV: "4"},
    ),
}  # fmt: skip

CASES_4 = {"sd15_cfg": dict(kind="sd15", size=128, sync_mode="corrected_async_gn", steps=3, warm_up=1, cfg=True)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


results = WorldResults(run_cases)  # every case of a world size in one spawn


def refused(per_rank, *needles):
    for rank, got in enumerate(per_rank):
        assert got[0] == "error" and got[1] == "ConfigError", f"rank {rank}: {got}"
        for needle in needles:
            assert needle in got[2], f"rank {rank}: {got[2]}"


@pytest.mark.parametrize("mode", SYNC_MODES)
@pytest.mark.parametrize("kind", list(SIZES))
def test_every_sync_mode_equals_the_simulator(kind, mode):
    case = CASES_2[f"{kind}_{mode}"]
    outs = ok(results(2, CASES_2)[f"{kind}_{mode}"])
    ref = simulated(case, patches=2)
    for rank, got in enumerate(outs):
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")
    exact = plain(case)
    if mode in STALE:
        assert (ref - exact).abs().max() > FAR, "a stale mode should be far from the exact run"
    else:  # full_sync
        torch.testing.assert_close(outs[0][0], exact, rtol=0, atol=TIGHT)


def test_warm_up_over_every_step_equals_plain_diffusers():
    case = CASES_2["sd15_exact_warm_up"]
    for got in ok(results(2, CASES_2)["sd15_exact_warm_up"]):
        torch.testing.assert_close(got[0], plain(case), rtol=0, atol=TIGHT)


def test_two_calls_in_a_row_identical():
    for got in ok(results(2, CASES_2)["sd15_two_calls"]):
        assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("name,puts", [("sd15_shm", True), ("sd15_shm_w2", True), ("sd15_shm_slots", False)])
def test_shm_equals_the_simulator(name, puts):
    """Over shm the stale K/V go as puts into the peer's mapped window (exchange.py, Note [K/V puts]), or with
    ASYNCDIFF_RT_PATCH_KV_PUTS=0 through the exchange slots: either way the simulator's result."""
    case = CASES_2[name]
    ref = simulated(case, patches=2)
    per_rank = results(2, CASES_2)[name]
    for rank, got in enumerate(ok(per_rank)):
        assert per_rank[rank][4] is puts, f"rank {rank}: K/V puts {per_rank[rank][4]}, expected {puts}"
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT)


def test_bytes_per_step_halos_to_neighbours_kv_and_moments_to_all():
    per_rank = results(2, CASES_2)
    full = per_rank["sd15_corrected_async_gn"][0][2]
    assert full["halo"] > 0 and full["kv"] > 0 and full["gn"] > 0 and full["output"] > 0
    assert full["halo"] + full["kv"] + full["gn"] < full["all_gather"]
    assert per_rank["sd15_separate_gn"][0][2]["gn"] == 0  # own moments only
    assert sum(per_rank["sd15_no_sync"][0][2][r] for r in ("halo", "kv", "gn")) == 0


@pytest.mark.parametrize("mode", ["corrected_async_gn", "full_sync"])
def test_three_patches_equal_the_simulator(mode):
    case = CASES_3[f"sdxl_p3_{mode}"]
    ref = simulated(case, patches=3)
    for rank, got in enumerate(ok(results(3, CASES_3)[f"sdxl_p3_{mode}"])):
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")
    if mode == "full_sync":
        torch.testing.assert_close(ref, plain(case), rtol=0, atol=TIGHT)


def test_shm_with_messages_in_pieces_equals_the_simulator():
    """Three patches over shm with 64 KiB slots: the closing exchanges (K/V to both peers, halos to one) are cut
    into pieces issued round by round, K/V also into groups of layers (exchange.py, Note [K/V groups]), and the
    result is still the simulator's."""
    case = CASES_3["sdxl_p3_shm_pieces"]
    ref = simulated(case, patches=3)
    per_rank = results(3, CASES_3)["sdxl_p3_shm_pieces"]
    for rank, got in enumerate(ok(per_rank)):
        assert per_rank[rank][2]["kv"] > 4 * 64 * 1024, per_rank[rank][2]  # several pieces per peer and step
        assert per_rank[rank][4] is False  # through the slots (ASYNCDIFF_RT_PATCH_KV_PUTS=0)
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")


def test_three_patches_with_k_v_puts_in_groups_equal_the_simulator():
    """Three patches over shm, each rank putting its K/V into both peers' windows at its own part's offsets, in
    about 4 groups each announced by its own messages (exchange.py, Notes [K/V puts] and [K/V groups])."""
    case = CASES_3["sdxl_p3_shm_puts"]
    ref = simulated(case, patches=3)
    per_rank = results(3, CASES_3)["sdxl_p3_shm_puts"]
    for rank, got in enumerate(ok(per_rank)):
        assert per_rank[rank][4] is True, f"rank {rank}: the K/V did not go as puts"
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")


def test_cfg_parallel_on_four_processes_equals_the_simulator():
    # Each guidance half runs batch 1 where the simulator runs batch 2: other kernels, rounding at ~1e-10.
    case = CASES_4["sd15_cfg"]
    ref = simulated(case, patches=2)
    for rank, got in enumerate(ok(results(4, CASES_4)["sd15_cfg"])):
        torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-7, msg=f"rank {rank}")


def test_height_that_does_not_split_is_refused_on_every_rank():
    refused(results(2, CASES_2)["bad_height"], "height 64", "2 x 8 = 16", "multiple of 128 pixels")


def test_ranks_that_disagree_fail_on_every_rank():
    refused(results(2, CASES_2)["bad_disagree"], "disagree", "sync_mode")


def test_world_size_mismatch_is_refused_on_every_rank():
    refused(results(2, CASES_2)["bad_world"], "needs 3 processes", "group has 2")


@pytest.mark.parametrize("transport", ["gloo", "shm"])  # shm: the survivor waits for K/V puts' messages
def test_dead_peer_makes_the_other_raise_within_the_timeout(transport):
    case = dict(kind="sd15", size=128, steps=6, warm_up=1, timeout_s=5, kill_rank=1, transport=transport)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(run_cases, 2, [case], timeout_s=120)
    elapsed = time.monotonic() - start
    assert "exit code 3" in info.value.errors[1]
    got = info.value.results[0][0]
    assert got[0] == "error" and got[1] == "TransportError", got
    assert "rank 1" in got[2], got[2]
    assert elapsed < 5 + 40, elapsed


# ---- refused before any communication (this process, no process group) ----------------------------------------------


def _no_hooks(pipe) -> bool:
    return "forward" not in pipe.unet.__dict__ and not getattr(type(pipe), "_asyncdiff_rt_hooked", False)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(sync_mode="async"), "unknown sync_mode 'async'"),
        (dict(warm_up=0), "warm_up must be an integer >= 1"),
        (dict(compile=True), r"compile=True\) is not supported yet"),
        (dict(transport="local"), "one process per patch"),
    ],
)
def test_bad_options_are_refused(options, match):
    pipe = pipe_of("sd15")
    with pytest.raises(ConfigError, match=match):
        PatchParallel(pipe, **options)
    assert _no_hooks(pipe)


@pytest.mark.parametrize(
    "kind, match",
    [("sd3", "has a transformer"), ("svd", "does not split video denoisers")],
)
def test_transformers_and_video_are_refused(kind, match):
    from asyncdiff_rt.tiny import make_pipeline

    with pytest.raises(ConfigError, match=match):
        PatchParallel(make_pipeline(kind))


def test_controlnet_with_cfg_parallel_is_refused():
    pipe = pipe_of("sdxl_controlnet")
    with pytest.raises(ConfigError, match="cfg_parallel=True.*ControlNet"):
        PatchParallel(pipe, cfg_parallel=True)
    assert _no_hooks(pipe)


@pytest.mark.parametrize("mode", CONTROLNET_MODES)
def test_controlnet_split_into_the_same_patches_equals_the_simulator(mode):
    # DistriFusion has no ControlNet: here its layers take the UNet's row patches and exchange like the UNet's
    case = CASES_2[f"sdxl_controlnet_{mode}"]
    ref = simulated(case, patches=2)
    for rank, got in enumerate(ok(results(2, CASES_2)[f"sdxl_controlnet_{mode}"])):
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TIGHT, msg=f"rank {rank}")
    exact = plain(case)
    if mode == "full_sync":
        torch.testing.assert_close(ref, exact, rtol=0, atol=TIGHT)
    else:
        assert (ref - exact).abs().max() > FAR


def test_a_layer_it_cannot_split_is_refused_by_name():
    pipe = pipe_of("sd15")
    config = {k: v for k, v in pipe.unet.config.items() if k != "_use_default_values"}
    pipe.unet = UNet2DConditionModel.from_config({**config, "downsample_padding": 0})
    with pytest.raises(ConfigError, match=r"down_blocks\.0\.downsamplers\.0\.conv: .*padding 0.*F\.pad"):
        PatchParallel(pipe)
    assert _no_hooks(pipe)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_group_norm_is_the_explicit_one_rounded_once(dtype):
    """The fused half-precision GroupNorm (Welford moments, batch_norm with the groups' statistics) against the
    explicit float64 form the simulator uses, on the same half input: off by the dtype's rounding only, stale
    statistics and a non-affine norm included (a wrong group-to-channel repeat would be off by whole units)."""
    from asyncdiff_rt.strategies.patches.layers import _moments, _normalise

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 12, 10, generator=g) * 3 + torch.arange(32.0)[:, None, None]).to(dtype)
    for affine in (True, False):
        norm = torch.nn.GroupNorm(8, 32, affine=affine)
        if affine:
            torch.nn.init.normal_(norm.weight, generator=g)
            torch.nn.init.normal_(norm.bias, generator=g)
        own, var = _moments(x, 8)
        wide = x.double().reshape(2, 8, -1)
        assert torch.allclose(own[0].double(), wide.mean(-1), rtol=1e-5, atol=1e-5)
        assert torch.allclose(own[1].double(), wide.square().mean(-1), rtol=1e-5, atol=1e-5)
        assert torch.allclose(var.double(), wide.var(-1, unbiased=False), rtol=1e-5, atol=1e-5)
        mean, stale_var = own[0] + 0.5, var * 1.5  # statistics other than the input's own (stale, combined)
        got = _normalise(x, norm.to(dtype), mean, stale_var)
        want = (wide - mean.double()[..., None]) * torch.rsqrt(stale_var.double()[..., None] + norm.eps)
        want = want.reshape(x.shape)
        if affine:
            want = want * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
        assert got.dtype == dtype and got.shape == x.shape
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("bias", [False, True])
def test_projections_write_into_their_part_of_the_kv_buffer(bias):
    """K/V projections straight into this patch's part of a (2, batch, P, tokens, inner) buffer (Note [kv slots]):
    equal to the module's output, for a plain Linear (its GEMMs write the part, batch row by batch row) and for a
    wrapped one (LoRA-like: through one copy); the rest of the buffer untouched."""
    from asyncdiff_rt.strategies.patches.layers import _project_into

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    linear = torch.nn.Linear(8, 4, bias=bias).double()
    wrapped = torch.nn.Sequential(linear)
    for module in (linear, wrapped):
        whole = torch.full((2, 2, 3, 6, 4), 7.0, dtype=torch.float64)
        with torch.no_grad():  # as pipelines call the denoiser (with autograd on: the copy)
            _project_into(module, x, whole[1, :, 1])
        torch.testing.assert_close(whole[1, :, 1], module(x), rtol=0, atol=1e-12)
        untouched = torch.ones_like(whole, dtype=torch.bool)
        untouched[1, :, 1] = False
        assert torch.equal(whole[untouched], torch.full_like(whole[untouched], 7.0))
