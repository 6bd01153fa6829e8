"""The simulator against asynchronous denoising worked out by hand on the toy denoiser (tests/toy.py)."""

import pytest
from toy import ToyPipeline

from asyncdiff_rt import simulate

PLAN3 = [["A"], ["B"], ["C"]]
PLAN2 = [["A"], ["B", "C"]]


def run_by_hand(K, eps_of_step, x0=1.0):
    xs, eps = [x0], []
    for k in range(K):
        e = eps_of_step(k, xs, eps)
        eps.append(e)
        xs.append(xs[-1] - 0.01 * e)
    return xs


def exact_eps(x, t):
    return 3 * (2 * x + t + 1)


def tau(k):
    return 10.0 - k


def test_exact_when_warm_up_covers_all_steps():
    pipe = ToyPipeline(6)
    expected = run_by_hand(6, lambda k, xs, eps: exact_eps(xs[k], tau(k)))
    assert simulate(pipe, plan=PLAN3, warm_up=6) == pytest.approx(expected, abs=1e-12)
    assert pipe() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("time_shift", [False, True])
def test_stride1_three_segments_by_hand(time_shift):
    # rank0: a_k = 2 x_k; rank1: b_k = a_{k-1} + t + 1; rank2: eps_k = 3 b_{k-1}  (k >= W = 1)
    K = 6
    a, b = {}, {}

    def eps_of(k, xs, eps):
        t = tau(k - 1) if (time_shift and k >= 1) else tau(k)
        if k == 0:
            a[0], b[0] = 2 * xs[0], 2 * xs[0] + tau(0) + 1
            return 3 * b[0]
        a[k] = 2 * xs[k]
        b[k] = a[k - 1] + t + 1
        return 3 * b[k - 1]

    expected = run_by_hand(K, eps_of)
    got = simulate(ToyPipeline(K), plan=PLAN3, warm_up=1, time_shift=time_shift)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != pytest.approx(ToyPipeline(K)(), abs=1e-9)  # asynchronous is not exact


@pytest.mark.parametrize("K", [6, 7])
@pytest.mark.parametrize("stride_eps", ["reuse", "fresh"])
def test_stride2_two_segments_by_hand(K, stride_eps):
    # rounds start at k=1 in pairs; ranks 0,1 use tau[k+1], rank 2 (S_1 = B,C) uses tau[k]
    # rank 2's eps_k = 3 (a_prev + tau_k + 1), a_prev = 2 x at the previous round's first step
    rounds = {}

    def eps_of(k, xs, eps):
        if k == 0:
            rounds["a"] = 2 * xs[0]
            return exact_eps(xs[0], tau(0))
        if (k - 1) % 2 == 1:  # second step of a pair
            return rounds["next"]
        paired = k + 1 < K
        a_prev = rounds["a"]
        e = 3 * (a_prev + tau(k) + 1)
        hi = tau(k + 1) if paired else tau(k)
        rounds["next"] = e if stride_eps == "reuse" else 3 * (a_prev + hi + 1)
        rounds["a"] = 2 * xs[k]
        return e

    expected = run_by_hand(K, eps_of)
    got = simulate(ToyPipeline(K), plan=PLAN2, stride=2, warm_up=1, stride_eps=stride_eps)
    assert got == pytest.approx(expected, abs=1e-12)


def test_rejects_bad_arguments():
    pipe = ToyPipeline(4)
    with pytest.raises(ValueError, match="stride"):
        simulate(pipe, plan=PLAN2, stride=3)
    with pytest.raises(ValueError, match="warm_up"):
        simulate(pipe, plan=PLAN2, warm_up=0)
    with pytest.raises(ValueError, match="unknown module"):
        simulate(pipe, plan=[["A"], ["D"]])


@pytest.mark.parametrize("time_shift", [False, True])
def test_vector_timestep_by_keyword_scaled_by_the_pipeline(time_shift):
    """FLUX-style: hidden_states and a batch vector timestep by keyword, passed as τ / 1000. The simulator must
    substitute τ as the pipeline passes it (here 1/1000 of the scheduler's), for each row of the batch."""
    from toy import ToyDiTPipeline

    K = 6
    rows = []
    for x0 in (1.0, 2.0):  # each row computes alone: the hand solution of the three-segment test, per row
        a, b = {}, {}

        def eps_of(k, xs, eps, a=a, b=b):
            t = tau(k - 1) if (time_shift and k >= 1) else tau(k)
            if k == 0:
                a[0], b[0] = 2 * xs[0], 2 * xs[0] + tau(0) + 1
                return 3 * b[0]
            a[k] = 2 * xs[k]
            b[k] = a[k - 1] + t + 1
            return 3 * b[k - 1]

        rows.append(run_by_hand(K, eps_of, x0))
    got = simulate(ToyDiTPipeline(K), plan=PLAN3, warm_up=1, time_shift=time_shift)
    for row, expected in zip(got, rows):
        assert row == pytest.approx(expected, abs=1e-9)
    assert got[0] != pytest.approx(ToyDiTPipeline(K)()[0], abs=1e-6)  # asynchronous is not exact


def test_runtime_refuses_a_timestep_transform_its_adapter_does_not_know():
    """The toy DiT's pipeline passes τ / 1000; the generic model adapter says τ: refused at the first step,
    naming the values, instead of computing with a timestep 1000x off."""
    from toy import ToyDiTPipeline

    from asyncdiff_rt import AsyncDiff, DenoiserError

    pipe = ToyDiTPipeline(4)
    ad = AsyncDiff(pipe, plan=PLAN3, warm_up=1, transport="local")
    with pytest.raises(DenoiserError, match="passed timestep 0.01 .* τ\\[0\\] = 10"):
        pipe()
    ad.remove()
