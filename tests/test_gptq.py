"""GPTQ rounding: never worse than round-to-nearest on the output error it minimizes."""

import numpy as np

from onnxqf import qmath
from onnxqf.gptq import HessianAccumulator, gptq_quantize


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
