"""Tests for onnxqf.maths.metrics."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from onnxqf.maths import metrics, qmath

# ----------------------------------------------------------------- magnitudes / difficulty


def test_channel_magnitudes_and_difficulty_hand_example():
    X = np.array([[3.0, 0.0, 0.0], [4.0, 0.0, 1.0]])
    c = metrics.channel_magnitudes(X)
    np.testing.assert_allclose(c, [5.0, 0.0, 1.0])
    # mean 2, squared deviations 9 + 4 + 1 = 14 -> population std sqrt(14 / 3)
    assert metrics.difficulty(c) == pytest.approx(math.sqrt(14.0 / 3.0))
    assert metrics.difficulty([2.0, 2.0, 2.0]) == 0.0


def test_weight_channel_magnitudes_hand_example():
    B = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.weight_channel_magnitudes(B), [5.0, 0.0, 1.0])


def test_channel_stats_streaming_matches_one_shot():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((103, 17)) * rng.uniform(0.1, 20, size=17)).astype(np.float32)
    X64 = X.astype(np.float64)
    ref_l2 = np.sqrt((X64**2).sum(axis=0))
    ref_absmax = np.abs(X64).max(axis=0)
    for bounds in ([0, 103], [0, 1, 50, 103], [0, 10, 20, 30, 40, 103], list(range(104))):
        st = metrics.ChannelStats()
        for a, b in zip(bounds[:-1], bounds[1:]):
            st.update(X[a:b])
        np.testing.assert_allclose(st.l2, ref_l2, rtol=1e-12)
        np.testing.assert_array_equal(st.absmax, ref_absmax)
        assert st.count == 103
        assert st.max == ref_absmax.max()
        np.testing.assert_allclose(st.rms, ref_l2 / math.sqrt(103), rtol=1e-12)
    np.testing.assert_allclose(metrics.channel_magnitudes(X), ref_l2, rtol=1e-12)
    # merge of two halves equals all
    s1 = metrics.ChannelStats().update(X[:40])
    s2 = metrics.ChannelStats().update(X[40:])
    s1.merge(s2)
    np.testing.assert_allclose(s1.l2, ref_l2, rtol=1e-12)
    np.testing.assert_array_equal(s1.absmax, ref_absmax)
    assert s1.count == 103
    # leading dims are flattened into tokens
    st3 = metrics.ChannelStats().update(X[:100].reshape(4, 25, 17))
    assert st3.count == 100
    np.testing.assert_allclose(st3.l2, np.sqrt((X64[:100] ** 2).sum(axis=0)), rtol=1e-12)


def test_channel_stats_errors():
    st = metrics.ChannelStats()
    assert st.count == 0 and st.max == 0.0
    with pytest.raises(ValueError):
        st.l2
    st.update(np.ones((2, 3)))
    with pytest.raises(ValueError):
        st.update(np.ones((2, 4)))


# ----------------------------------------------------------------- layer error


def test_layer_error_hand_examples():
    # 2 bits -> qmax 1. X row [1, 0.4] -> Q(X) = [1, 0]; B = [[1], [1]] is exact.
    # X @ B = 1.4, Q(X) @ Q(B) = 1 -> squared error 0.16, reference 1.96.
    X = np.array([[1.0, 0.4]])
    B = np.array([[1.0], [1.0]])
    assert metrics.layer_error(X, B, bits=2) == pytest.approx((0.16, 1.96))
    # Values exactly on the int8 grid (row max 127, column max 127, integers) -> zero error.
    X = np.array([[127.0, -3.0, 5.0], [1.0, 127.0, 0.0]])
    B = np.array([[127.0, 2.0], [-4.0, 127.0], [0.0, -127.0]])
    assert metrics.layer_error(X, B)[0] == 0.0


def test_layer_error_matches_formula_and_adds_over_chunks():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((77, 32)).astype(np.float32)
    X[:, 2] *= 40
    B = rng.standard_normal((32, 24))
    for clip in (False, True):
        Xq = qmath.fake_quant_per_token(X, 8)
        Bq = qmath.fake_quant_weight(B, 8, clip_search=clip)
        ref = float(((X.astype(np.float64) @ B - Xq @ Bq) ** 2).sum())
        one, total = metrics.layer_error(X, B, bits=8, clip_search=clip)
        assert one == pytest.approx(ref, rel=1e-12)
        assert 0 < one / total < 1e-2
        for bounds in ([0, 1, 2, 77], [0, 30, 60, 77]):  # per-token quantization: chunks add up
            parts = [metrics.layer_error(X[a:b], B, bits=8, Bq=Bq)[0] for a, b in zip(bounds[:-1], bounds[1:])]
            assert sum(parts) == pytest.approx(ref, rel=1e-12)
    # fewer bits -> larger error
    assert metrics.layer_error(X, B, bits=4)[0] > metrics.layer_error(X, B, bits=8)[0]


# ----------------------------------------------------------------- logits


def test_log_softmax_stable():
    z = np.array([[1000.0, 1000.0], [-1000.0, 0.0]], dtype=np.float32)
    ls = metrics.log_softmax(z)
    assert ls.dtype == np.float64
    np.testing.assert_allclose(ls[0], [-math.log(2), -math.log(2)])
    np.testing.assert_allclose(ls[1], [-1000.0, 0.0])
    np.testing.assert_allclose(np.exp(ls).sum(-1), 1.0)


def test_kl_hand_example():
    p1, q1 = np.log([0.5, 0.25, 0.25]), np.log([0.25, 0.5, 0.25])
    p2, q2 = np.zeros(3), np.log([0.5, 0.25, 0.25])
    lp = np.stack([p1, p2]) + 100.0  # shift-invariant
    lq = np.stack([q1, q2]) - 7.0
    # token 1: 0.5 ln2 + 0.25 ln(1/2) = 0.25 ln 2
    # token 2: sum 1/3 ln((1/3)/q) = -ln3 - (1/3)(ln .5 + 2 ln .25) = -ln3 + (5/3) ln2
    expected = (0.25 * math.log(2) + (5.0 / 3.0) * math.log(2) - math.log(3)) / 2
    assert metrics.kl_divergence(lp, lq) == pytest.approx(expected, rel=1e-12)
    assert metrics.kl_divergence(lp, lp) == pytest.approx(0.0, abs=1e-15)
    assert metrics.kl_divergence(lp[None], lq[None]) == pytest.approx(expected, rel=1e-12)


def test_kl_zero_probability_terms():
    # p puts zero mass where q is -inf: term contributes 0, not NaN.
    lp = np.array([[0.0, -np.inf]])
    lq = np.array([[0.0, -np.inf]])
    assert metrics.kl_divergence(lp, lq) == 0.0


def test_perplexity_nll_and_top1():
    logits = np.zeros((2, 3, 4))  # uniform over 4 -> nll ln4 per scored token, ppl 4
    targets = np.array([[1, 2, -1], [0, -100, 3]])
    nll, n = metrics.perplexity_nll(logits, targets)
    assert n == 4
    assert nll == pytest.approx(4 * math.log(4))
    # shorter targets (T-1 next-token ids) are padded as "no target"
    nll, n = metrics.perplexity_nll(np.zeros((5, 4)), np.array([0, 1, 2, 3]))
    assert n == 4
    # a hand example: logits [ln1, ln3] -> p = [0.25, 0.75]
    nll, n = metrics.perplexity_nll(np.log([[1.0, 3.0], [1.0, 3.0]]), np.array([1, 0]))
    assert n == 2 and nll == pytest.approx(-math.log(0.75) - math.log(0.25))

    a = np.array([[0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.2, 0.1]])
    b = np.array([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 9.0]])
    assert metrics.top1_agreement(a, b) == 0.5


def test_logit_comparison_streaming_equals_one_shot():
    rng = np.random.default_rng(2)
    T, V = 37, 50
    lo = rng.standard_normal((T, V)).astype(np.float32) * 3
    ln = (lo + 0.3 * rng.standard_normal((T, V))).astype(np.float32)
    tg = rng.integers(0, V, size=T)
    tg[-1] = -1  # last position has no next token
    tg[5] = -1

    kl = metrics.kl_divergence(lo, ln)
    nll_o, n = metrics.perplexity_nll(lo, tg)
    nll_n, _ = metrics.perplexity_nll(ln, tg)
    top1 = metrics.top1_agreement(lo, ln)
    assert n == T - 2

    for chunk_rows in (1, 4, 64):
        for bounds in ([0, T], [0, 10, 11, 30, T]):
            acc = metrics.LogitComparison(chunk_rows=chunk_rows)
            for a, b in zip(bounds[:-1], bounds[1:]):
                acc.update(lo[a:b], ln[a:b], tg[a:b])
            r = acc.result()
            assert r["tokens"] == T  # KL/top1 include positions without a target
            assert r["ppl_tokens"] == T - 2
            assert r["kl"] == pytest.approx(kl, rel=1e-12)
            assert r["top1"] == pytest.approx(top1)
            assert r["ppl_orig"] == pytest.approx(math.exp(nll_o / n), rel=1e-12)
            assert r["ppl_new"] == pytest.approx(math.exp(nll_n / n), rel=1e-12)

    # merge of two windows == one accumulator over both; batched [B, T, V] input too
    a1 = metrics.LogitComparison().update(lo[:20], ln[:20], tg[:20])
    a2 = metrics.LogitComparison().update(lo[20:], ln[20:], tg[20:])
    r = a1.merge(a2).result()
    assert r["kl"] == pytest.approx(kl, rel=1e-12) and r["tokens"] == T
    rb = metrics.LogitComparison().update(lo[:36].reshape(2, 18, V), ln[:36].reshape(2, 18, V)).result()
    assert rb["kl"] == pytest.approx(metrics.kl_divergence(lo[:36], ln[:36]), rel=1e-12)
    assert math.isnan(rb["ppl_orig"]) and rb["tokens"] == 36

    same = metrics.LogitComparison().update(lo, lo, tg).result()
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1"] == 1.0
    assert same["ppl_orig"] == same["ppl_new"]


def test_logit_comparison_is_memory_light():
    T, V = 512, 8192  # float32 inputs: 16 MiB each; a full float64 copy would be 32 MiB
    rng = np.random.default_rng(3)
    lo = rng.standard_normal((T, V), dtype=np.float32)
    ln = lo + np.float32(0.01)
    tg = rng.integers(0, V, size=T)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        metrics.LogitComparison(chunk_rows=32).update(lo, ln, tg).result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 16 * 2**20  # bounded by chunk_rows * V, not T * V
