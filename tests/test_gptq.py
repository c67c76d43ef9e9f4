"""GPTQ rounding: never worse than round-to-nearest on the output error it minimizes."""

import numpy as np

from onnxqf.maths import qmath
from onnxqf.maths.gptq import HessianAccumulator, gptq_quantize


def output_error(X, B, q, scale):
    return float(np.sum((X @ B - X @ (q.astype(np.float64) * scale)) ** 2))


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(48, 48))
    X = rng.normal(size=(2000, 48)) @ mix  # strongly correlated channels
    X[:, 3] *= 20  # and an outlier channel
    B = rng.normal(size=(48, 32))
    acc = HessianAccumulator()
    for chunk in np.array_split(X, 7):
        acc.update(chunk)
    np.testing.assert_allclose(acc.H, X.T @ X, rtol=1e-10)
    assert acc.count == 2000
    q_rtn, s = qmath.quantize_weight_per_channel(B, bits=4)
    q_gptq, s2 = gptq_quantize(B, acc.H, bits=4, block=16)
    np.testing.assert_array_equal(s, s2)  # same storage format: same scales
    assert q_gptq.dtype == np.int8 and np.abs(q_gptq).max() <= 7
    assert output_error(X, B, q_gptq, s) < 0.8 * output_error(X, B, q_rtn, s)


def test_gptq_with_identity_hessian_is_rtn():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(16, 8))
    q_rtn, s = qmath.quantize_weight_per_channel(B)
    q, _ = gptq_quantize(B, np.eye(16), damp=0.0, act_order=False)
    np.testing.assert_array_equal(q, q_rtn)


def test_dead_channels_are_zero():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(100, 8))
    X[:, 5] = 0.0
    B = rng.normal(size=(8, 4))
    q, s = gptq_quantize(B, X.T @ X)
    assert np.all(q[5] == 0)


def _problem(n=96, out=40, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4 * n, n)) @ rng.normal(size=(n, n))
    return rng.normal(size=(n, out)), X.T @ X


def test_two_level_lazy_updates_equal_one_level():
    """The outer lazy level (one product per outer block) only reorders the same sums."""
    from onnxqf.maths.gptq import gptq_round, prepare

    B, H = _problem()
    scale = qmath.quantize_weight_per_channel(B, bits=4)[1]

    def rtn(row, w, ahead):
        return np.clip(np.rint(w / scale), -7, 7) * scale

    p = prepare(H, act_order=True)
    one = gptq_round(B, p, rtn, block=16, outer=16)
    two = gptq_round(B, p, rtn, block=16, outer=48)
    np.testing.assert_array_equal(one, two)


def test_float32_factor_above_the_float64_limit(monkeypatch):
    """Above FLOAT64_MAX_CHANNELS the factor is float32 (PyTorch, in place) and U^T U is the damped H^-1."""
    from onnxqf.maths import gptq

    B, H = _problem()
    monkeypatch.setattr(gptq, "FLOAT64_MAX_CHANNELS", 32)
    calls = []

    def fetch():
        calls.append(1)
        return H.copy()

    p = gptq.prepare(fetch, damp=0.01, act_order=False)
    assert p.U.dtype == np.float32 and len(calls) == 1
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(len(H))
    U = np.triu(p.U.astype(np.float64))
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=2e-3, atol=1e-4 * np.abs(np.linalg.inv(Hd)).max())
    q32, s = gptq_quantize(B, p, bits=4)
    q64, _ = gptq_quantize(B, H, bits=4, act_order=False)
    err = lambda q: float(np.sum((B - q * s) * (H @ (B - q * s))))  # noqa: E731
    assert abs(err(q32) - err(q64)) <= 0.01 * err(q64)


def test_float32_failure_falls_back_to_float64_from_a_second_copy(monkeypatch):
    from onnxqf.maths import gptq

    B, H = _problem()
    monkeypatch.setattr(gptq, "FLOAT64_MAX_CHANNELS", 32)
    monkeypatch.setattr(gptq, "_torch_upper_factor", lambda work: None)  # "not positive definite in float32"
    calls = []

    def fetch():
        calls.append(1)
        return H.copy()

    p = gptq.prepare(fetch, act_order=True)
    assert p.U.dtype == np.float64 and len(calls) == 2
    monkeypatch.setattr(gptq, "FLOAT64_MAX_CHANNELS", 4096)
    ref = gptq.prepare(H, act_order=True)
    np.testing.assert_allclose(p.U, ref.U, rtol=1e-12, atol=1e-15)
