"""The patch simulator against the toy of patch_toy.py, solved by hand in plain torch on full tensors.

The hand solution describes each view differently from the simulator: a view's layer input is the full image
*assembled* from its own fresh rows and the other patches' rows (of step k or k-1), a convolution runs on that
whole image with its own zero padding and keeps the view's output rows, attention takes all tokens of it as
keys/values. GroupNorm moments are combined by the formulas of DESIGN §10, written out below.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from patch_toy import GROUPS, PatchToyNet, PatchToyPipeline, tokens, toy_latent, untokens

from asyncdiff_rt.simulators.patch import SYNC_MODES, simulate_patch

STALE_MODES = ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "no_sync")


# ---- the hand solution --------------------------------------------------------------------------------------------


def rows(x, p, P):
    n = x.shape[-2] // P
    return x[..., p * n : (p + 1) * n, :]


def assemble(fresh, other, p, P):
    """The full-height image view p sees: its own rows from `fresh`, every other patch's rows from `other`."""
    out = other.clone()
    n = fresh.shape[-2] // P
    out[..., p * n : (p + 1) * n, :] = rows(fresh, p, P)
    return out


def per_view(fn, P):
    return torch.cat([fn(p) for p in range(P)], dim=-2)


def moments(x):
    flat = x.reshape(x.shape[0], GROUPS, -1)
    return flat.mean(-1), (flat * flat).mean(-1)


def combine(rule, fresh, prev, p, P):
    """(E[x], E[x^2]) view p normalises with, from every patch's fresh and previous-step moments."""
    if rule == "exact":
        return sum(m[0] for m in fresh) / P, sum(m[1] for m in fresh) / P
    if rule == "own":
        return fresh[p]
    if rule == "corrected":  # mean of step k-1 + (own at k - own at k-1)
        return tuple(sum(m[i] for m in prev) / P + fresh[p][i] - prev[p][i] for i in (0, 1))
    # stale: own fresh, others of step k-1
    return tuple((fresh[p][i] + sum(prev[q][i] for q in range(P) if q != p)) / P for i in (0, 1))


def group_norm(norm, x, mean, sq, own, rule, fallbacks):
    var = sq - mean * mean
    if rule in ("corrected", "stale"):
        negative = var < 0
        fallbacks.append(int(negative.sum()))
        var = torch.where(negative, own[1] - own[0] * own[0], var)  # own patch's fresh variance
    flat = x.reshape(x.shape[0], GROUPS, -1)
    y = ((flat - mean[..., None]) / torch.sqrt(var[..., None] + norm.eps)).reshape(x.shape)
    return y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def attend(attn, own_tokens, all_tokens):
    q, k, v = attn.to_q(own_tokens), attn.to_k(all_tokens), attn.to_v(all_tokens)
    weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.to_out[0](weights @ v)


def hand_step(net, x, t, P, rule, exact, prev, fallbacks):
    """One denoiser call over P views; `prev` holds every layer input and the moments of the previous step."""
    h = net.conv_in(x) + 0.1 * t  # conv_in reads the full latent
    m = [moments(rows(h, p, P)) for p in range(P)]

    def norm_view(p):
        mean, sq = combine(rule, m, prev and prev["m"], p, P)
        return group_norm(net.norm, rows(h, p, P), mean, sq, m[p], rule, fallbacks)

    g = F.silu(per_view(norm_view, P))
    kv = g if exact else prev["g"]
    a = g + per_view(lambda p: untokens(attend(net.attn, tokens(rows(g, p, P)), tokens(assemble(g, kv, p, P))),
                                        rows(g, p, P)), P)  # fmt: skip
    halo = a if exact else prev["a"]
    d = per_view(lambda p: rows(net.down(assemble(a, halo, p, P)), p, P), P)
    u = h + F.interpolate(d, scale_factor=2.0, mode="nearest")
    halo = u if exact else prev["u"]
    eps = per_view(lambda p: rows(net.conv_out(assemble(u, halo, p, P)), p, P), P)
    return eps, dict(m=m, g=g, a=a, u=u)


def hand_solution(pipe, x0, P, warm_up, mode):
    """The pipeline's loop with the §10 rules; returns the final latent, each step's ε and the fallback count."""
    net, x, prev, all_eps, fallbacks = pipe.unet, x0, None, [], []
    for k, t in enumerate(pipe.timesteps):
        if mode == "naive":  # every patch an image of its own, all the way
            eps = torch.cat([net(rows(x, p, P), t)[0] for p in range(P)], dim=-2)
        else:
            exact = k < warm_up or mode == "full_sync"
            if exact or mode == "sync_gn":
                rule = "exact"
            elif mode in ("separate_gn", "no_sync"):
                rule = "own"
            else:
                rule = "corrected" if mode == "corrected_async_gn" else "stale"
            eps, new = hand_step(net, x, t, P, rule, exact, prev, fallbacks)
            if not (mode == "no_sync" and k >= warm_up):  # no_sync keeps step W-1's halos and K/V
                prev = new
        all_eps.append(eps)
        x = x - 0.2 * eps
    return x, all_eps, sum(fallbacks)


def close(a, b, tol=1e-10):
    return (a - b).abs().max().item() < tol


# ---- the simulator against it -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on shared cores their spin-waits cost seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    return PatchToyPipeline()


@pytest.fixture(scope="module")
def x0():
    return toy_latent()


@pytest.mark.parametrize("mode", [m for m in SYNC_MODES if m != "naive"])
def test_warm_up_steps_are_exact(toy, x0, mode):
    exact = toy(x0)
    exact_eps = list(toy.eps)
    assert close(simulate_patch(toy, x0, patches=2, warm_up=len(toy.timesteps), sync_mode=mode), exact)
    simulate_patch(toy, x0, patches=2, warm_up=2, sync_mode=mode)
    assert all(close(e, f) for e, f in zip(toy.eps[:2], exact_eps[:2]))
    if mode != "full_sync":
        assert not close(toy.eps[2], exact_eps[2], 1e-6)


def test_full_sync_is_exact_at_every_step(toy, x0):
    exact = toy(x0)
    assert close(simulate_patch(toy, x0, patches=2, warm_up=1, sync_mode="full_sync"), exact)
    assert close(hand_solution(toy, x0, 2, 1, "full_sync")[0], exact)  # the hand solution agrees


@pytest.mark.parametrize("warm_up", [1, 2])
@pytest.mark.parametrize("mode", [*STALE_MODES, "naive"])
def test_two_patches_match_the_hand_solution(toy, x0, mode, warm_up):
    expected, _, _ = hand_solution(toy, x0, 2, warm_up, mode)
    got = simulate_patch(toy, x0, patches=2, warm_up=warm_up, sync_mode=mode)
    assert close(got, expected)
    assert not close(got, toy(x0), 1e-6)  # the approximation is not the exact result


def test_modes_differ_from_each_other(toy, x0):
    results = {m: simulate_patch(toy, x0, patches=2, warm_up=1, sync_mode=m) for m in [*STALE_MODES, "naive"]}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not close(results[a], results[b], 1e-8), (a, b)


@pytest.mark.parametrize("mode", ["corrected_async_gn", "no_sync", "naive"])
def test_three_patches_match_the_hand_solution(toy, x0, mode):
    expected, _, _ = hand_solution(toy, x0, 3, 1, mode)
    assert close(simulate_patch(toy, x0, patches=3, warm_up=1, sync_mode=mode), expected)


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_one_patch_is_exact_in_every_mode(toy, x0, mode):
    assert close(simulate_patch(toy, x0, patches=1, warm_up=1, sync_mode=mode), toy(x0))


def test_negative_corrected_variance_falls_back_to_own_fresh_variance():
    # A jump of the timestep shifts every feature by 0.1 * 900; patches with very different means then make
    # "mean of step k-1 + own change" a negative variance: mean^2 grows faster than E[x^2].
    pipe = PatchToyPipeline(timesteps=(0.0, 900.0, 905.0))
    x0 = toy_latent()
    x0[..., :6, :] += 4.0
    x0[..., 6:, :] -= 4.0
    expected, _, fallbacks = hand_solution(pipe, x0, 2, 1, "corrected_async_gn")
    assert fallbacks > 0 and torch.isfinite(expected).all()
    got = simulate_patch(pipe, x0, patches=2, warm_up=1, sync_mode="corrected_async_gn")
    assert close(got, expected)
    # stale_gn mixes valid moments, which cannot give a negative variance: no fallback, still the formula
    expected, _, fallbacks = hand_solution(pipe, x0, 2, 1, "stale_gn")
    assert fallbacks == 0 and close(simulate_patch(pipe, x0, patches=2, warm_up=1, sync_mode="stale_gn"), expected)


# ---- bad input and clean-up -------------------------------------------------------------------------------------


def _no_overrides(net):
    return all("forward" not in m.__dict__ for m in net.modules())


def test_overrides_are_removed_after_a_call_and_after_an_error(toy, x0):
    simulate_patch(toy, x0, patches=2, warm_up=1)
    assert _no_overrides(toy.unet)

    def fail_in_view_one(module, args):
        if threading.current_thread().name == "patch-view-1":
            raise RuntimeError("boom in view 1")

    hook = toy.unet.down.register_forward_pre_hook(fail_in_view_one)
    try:  # view 0 waits on a barrier for view 1: it must be released, and the real error reported
        with pytest.raises(RuntimeError, match="boom in view 1"):
            simulate_patch(toy, x0, patches=2, warm_up=1, sync_mode="full_sync")
    finally:
        hook.remove()
    assert _no_overrides(toy.unet)
    assert close(toy(x0), PatchToyPipeline()(x0))  # and the toy computes as before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patches=0), "patches must be an integer >= 1"),
        (dict(patches=2, sync_mode="async"), "unknown sync_mode 'async'"),
        (dict(patches=2, warm_up=0), "warm_up must be an integer >= 1"),
        (dict(patches=5), "latent height 12 does not split into 5 patches.*multiple of 10"),
        (dict(patches=4), "latent height 12 does not split into 4 patches.*multiple of 8"),
    ],
)
def test_bad_arguments_are_refused(toy, x0, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_patch(toy, x0, **kwargs)
    assert _no_overrides(toy.unet)


class _GluePaddedNet(PatchToyNet):
    """Downsamples as diffusers' Downsample2D(padding=0) does: F.pad by the glue, then a padding-0 conv."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=0).double()


def test_glue_padded_convolution_is_refused_by_name(x0):
    pipe = PatchToyPipeline()
    pipe.unet = _GluePaddedNet()
    with pytest.raises(ValueError, match=r"convolution down: .*padding 0.*F\.pad"):
        simulate_patch(pipe, x0, patches=2)
