"""Tests for onnxqf.maths.qmath (hand-computed examples + properties)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxqf.maths import qmath

# ----------------------------------------------------------------- per-channel weights


def test_quantize_weight_hand_example():
    # Column maxima 127 and 254 give exact scales 1 and 2; third column is all zero.
    B = np.array(
        [
            [127.0, 254.0, 0.0],
            [63.5, -1.0, 0.0],  # 63.5 -> 64 (half to even); -1/2 = -0.5 -> -0
            [-2.5, 0.5, 0.0],  # -2.5 -> -2 (half to even); 0.25 -> 0
            [0.0, 3.0, 0.0],  # 1.5 -> 2
        ]
    )
    q, scale = qmath.quantize_weight_per_channel(B)
    assert q.dtype == np.int8
    assert q.shape == B.shape
    np.testing.assert_array_equal(scale, [1.0, 2.0, 1.0])
    np.testing.assert_array_equal(q, [[127, 127, 0], [64, 0, 0], [-2, 0, 0], [0, 2, 0]])
    np.testing.assert_array_equal(
        qmath.dequantize_weight(q, scale), [[127, 254, 0], [64, 0, 0], [-2, 0, 0], [0, 4, 0]]
    )
    assert np.all(np.isfinite(qmath.fake_quant_weight(B)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip_search", [False, True])
def test_quantize_weight_roundtrip_properties(bits, clip_search):
    rng = np.random.default_rng(bits)
    B = rng.standard_normal((64, 48)) * rng.uniform(0.01, 10.0, size=48)
    B[:, 5] = 0.0
    q, scale = qmath.quantize_weight_per_channel(B, bits=bits, clip_search=clip_search)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and q.shape == B.shape and scale.shape == (48,)
    assert q.min() >= -qmax and q.max() <= qmax
    assert scale[5] == 1.0 and np.all(q[:, 5] == 0)
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    deq = qmath.dequantize_weight(q, scale)
    if not clip_search:
        # Pure rounding: every element within half a step.
        assert np.all(np.abs(deq - B) <= scale[None, :] / 2 * (1 + 1e-12))
        np.testing.assert_allclose(scale[:5], np.abs(B[:, :5]).max(axis=0) / qmax)
    else:
        # Clipping only shrinks scales; elements inside the clip range are within half a step.
        nz = np.abs(B).max(axis=0) > 0
        assert np.all(scale[nz] <= np.abs(B[:, nz]).max(axis=0) / qmax * (1 + 1e-12))
        assert np.all(scale[nz] >= 0.5 * np.abs(B[:, nz]).max(axis=0) / qmax * (1 - 1e-12))
        inside = np.abs(B) <= qmax * scale[None, :]
        assert np.all((np.abs(deq - B) <= scale[None, :] / 2 * (1 + 1e-12))[inside])
    np.testing.assert_array_equal(qmath.fake_quant_weight(B, bits=bits, clip_search=clip_search), deq)


def test_clip_search_never_worse_and_helps_with_outliers():
    rng = np.random.default_rng(0)
    B = rng.laplace(size=(256, 64))
    B[0, :32] *= 30.0  # big outliers in half the columns
    for bits in (3, 4, 8):
        q0, s0 = qmath.quantize_weight_per_channel(B, bits=bits)
        q1, s1 = qmath.quantize_weight_per_channel(B, bits=bits, clip_search=True)
        e0 = ((qmath.dequantize_weight(q0, s0) - B) ** 2).sum(axis=0)
        e1 = ((qmath.dequantize_weight(q1, s1) - B) ** 2).sum(axis=0)
        assert np.all(e1 <= e0)
    # at 4 bits a heavy-tailed matrix is clearly better with clipping
    assert e1.sum() <= e0.sum()
    q0, s0 = qmath.quantize_weight_per_channel(B, bits=4)
    q1, s1 = qmath.quantize_weight_per_channel(B, bits=4, clip_search=True)
    e0 = ((qmath.dequantize_weight(q0, s0) - B) ** 2).sum()
    e1 = ((qmath.dequantize_weight(q1, s1) - B) ** 2).sum()
    assert e1 < e0
    assert np.any(s1 < s0)


def test_clip_search_picks_best_ratio_hand_example():
    # qmax = 1 (2 bits). Column [1, 0.4, 0.4, 0.4]:
    #   ratio 1   -> scale 1,   q = [1, 0, 0, 0], err = 3 * 0.16 = 0.48
    #   ratio 0.5 -> scale 0.5, q = [1, 1, 1, 1], err = 0.25 + 3 * 0.01 = 0.28 (best)
    B = np.array([[1.0], [0.4], [0.4], [0.4]])
    q, s = qmath.quantize_weight_per_channel(B, bits=2, clip_search=True, grid=2, min_ratio=0.5)
    np.testing.assert_array_equal(s, [0.5])
    np.testing.assert_array_equal(q[:, 0], [1, 1, 1, 1])
    q, s = qmath.quantize_weight_per_channel(B, bits=2, clip_search=False)
    np.testing.assert_array_equal(s, [1.0])
    np.testing.assert_array_equal(q[:, 0], [1, 0, 0, 0])


def test_wider_bits_dtype():
    B = np.array([[1000.0, -3.0], [2047.0, 1.0]])
    q, s = qmath.quantize_weight_per_channel(B, bits=12)
    assert q.dtype == np.int16
    assert q[1, 0] == 2047 and q.min() >= -2047


# ----------------------------------------------------------------- per-token activations


def test_fake_quant_per_token_hand_example():
    X = np.array(
        [
            [127.0, 63.5, -0.5],  # scale 1: 63.5 -> 64, -0.5 -> -0
            [0.0, 0.0, 0.0],  # zero row stays zero, no NaN
            [254.0, 3.0, -1.0],  # scale 2: 1.5 -> 2 (x2 = 4), -0.5 -> -0
        ]
    )
    Y = qmath.fake_quant_per_token(X)
    np.testing.assert_array_equal(Y, [[127, 64, 0], [0, 0, 0], [254, 4, 0]])
    assert Y.dtype == np.float64


def test_fake_quant_per_token_properties():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((32, 100)).astype(np.float32) * rng.uniform(0.1, 50, size=(32, 1))
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        Y = qmath.fake_quant_per_token(X, bits)
        scale = np.abs(X.astype(np.float64)).max(axis=1, keepdims=True) / qmax
        assert np.all(np.abs(Y - X) <= scale / 2 * (1 + 1e-12))
        levels = Y / scale
        np.testing.assert_allclose(levels, np.rint(levels), atol=1e-9)
        assert np.abs(levels).max() <= qmax + 1e-9
    # idempotent
    Y = qmath.fake_quant_per_token(X)
    np.testing.assert_allclose(qmath.fake_quant_per_token(Y), Y, rtol=0, atol=1e-12)
    # leading dims are rows too
    np.testing.assert_array_equal(
        qmath.fake_quant_per_token(X.reshape(4, 8, 100)).reshape(32, 100), qmath.fake_quant_per_token(X)
    )


# ----------------------------------------------------------------- DynamicQuantizeLinear


def test_dynamic_quantize_linear_hand_examples():
    # range [-1, 2]: scale 3/255, zero point 85
    y, s, zp = qmath.dynamic_quantize_linear(np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32))
    assert y.dtype == np.uint8 and s.dtype == np.float32 and zp.dtype == np.uint8
    assert s == np.float32(3.0) / np.float32(255.0)
    assert zp == 85
    np.testing.assert_array_equal(y, [0, 85, 170, 255])

    # all positive: range is extended to include 0 -> [0, 2.55], zp 0
    y, s, zp = qmath.dynamic_quantize_linear(np.array([0.5, 1.0, 2.55], dtype=np.float32))
    assert zp == 0
    np.testing.assert_allclose(s, 0.01, rtol=1e-6)
    np.testing.assert_array_equal(y, [50, 100, 255])

    # all negative: range [-2.55, 0], zp 255
    y, s, zp = qmath.dynamic_quantize_linear(np.array([[-2.55, -1.0]], dtype=np.float32))
    assert zp == 255 and y.shape == (1, 2)
    np.testing.assert_array_equal(y, [[0, 155]])

    # all zero: scale 1 (no division by zero)
    y, s, zp = qmath.dynamic_quantize_linear(np.zeros((2, 3), dtype=np.float32))
    assert s == 1.0 and zp == 0 and np.all(y == 0)

    # round half to even inside: range [0, 255] -> scale 1; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    y, s, zp = qmath.dynamic_quantize_linear(np.array([0.5, 1.5, 2.5, 255.0], dtype=np.float32))
    assert s == 1.0 and zp == 0
    np.testing.assert_array_equal(y, [0, 2, 2, 255])


def test_fake_quant_asym_uint8():
    x = np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32)
    s = float(np.float32(3.0) / np.float32(255.0))
    np.testing.assert_allclose(qmath.fake_quant_per_tensor_asym_uint8(x), [-85 * s, 0, 85 * s, 170 * s])
    rng = np.random.default_rng(2)
    X = rng.standard_normal((16, 64)).astype(np.float32) * 3 + 1
    X[0, 0] = 0.0
    y, scale, zp = qmath.dynamic_quantize_linear(X)
    Y = qmath.fake_quant_per_tensor_asym_uint8(X)
    assert Y.dtype == np.float64
    assert np.all(np.abs(Y - X) <= float(scale) / 2 * (1 + 1e-5))
    assert Y[0, 0] == 0.0  # zero is exactly representable


def test_dynamic_quantize_linear_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    graph = helper.make_graph(
        [node],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", "C"]),
            helper.make_tensor_value_info("y_scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("y_zero_point", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(3)
    cases = [
        rng.standard_normal((37, 129)).astype(np.float32),
        (rng.standard_normal((8, 1000)) * 50 + 20).astype(np.float32),
        np.abs(rng.standard_normal((5, 33))).astype(np.float32),
        -np.abs(rng.standard_normal((5, 33))).astype(np.float32),
        rng.laplace(size=(64, 256)).astype(np.float32),
        np.array([[-1.0, 0.0, 1.0, 2.0]], dtype=np.float32),
        np.array([[0.5, 1.5, 2.5, 255.0]], dtype=np.float32),
        np.zeros((3, 4), dtype=np.float32),
    ]
    for x in cases:
        y_ref, s_ref, zp_ref = sess.run(None, {"x": x})
        y, s, zp = qmath.dynamic_quantize_linear(x)
        assert s == s_ref, (s, s_ref)
        assert zp == zp_ref, (zp, zp_ref)
        np.testing.assert_array_equal(y, y_ref)


# ----------------------------------------------------------------- smoothing


def test_weight_row_absmax():
    B = np.array([[1.0, -3.0], [0.0, 0.0], [-2.0, 0.5]])
    np.testing.assert_array_equal(qmath.weight_row_absmax(B), [3.0, 0.0, 2.0])


def test_smooth_scales_hand_example():
    act = np.array([4.0, 0.0, 9.0, 1.0])
    w = np.array([1.0, 2.0, 0.0, 4.0])
    # alpha 0.5: sqrt(4)/sqrt(1)=2; zero act -> 1; zero weight -> 1; sqrt(1)/sqrt(4) = 0.5
    np.testing.assert_allclose(qmath.smooth_scales(act, w, alpha=0.5), [2.0, 1.0, 1.0, 0.5])
    # alpha 0.75: 4^0.75 / 1 = 2.828..., 1 / 4^0.25 = 0.7071...
    np.testing.assert_allclose(
        qmath.smooth_scales(act, w, alpha=0.75), [4**0.75, 1.0, 1.0, 4**-0.25]
    )
    # clamp to [1e-5, 1e5]
    s = qmath.smooth_scales(np.array([1e12, 1e-12, np.nan]), np.array([1.0, 1e12, 1.0]))
    np.testing.assert_allclose(s, [1e5, 1e-5, 1.0])


def test_smoothing_preserves_matmul_and_balances_ranges():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 16))
    X[:, 3] *= 100.0  # outlier channel
    B = rng.standard_normal((16, 8))
    s = qmath.smooth_scales(np.abs(X).max(axis=0), qmath.weight_row_absmax(B), alpha=0.5)
    assert s.shape == (16,) and np.all(s > 0)
    np.testing.assert_allclose((X / s) @ (s[:, None] * B), X @ B, rtol=1e-12, atol=1e-10)
    # alpha 0.5 equalizes the per-channel maxima of X/s and diag(s) B
    np.testing.assert_allclose(
        np.abs(X / s).max(axis=0), qmath.weight_row_absmax(s[:, None] * B), rtol=1e-12
    )
