"""The folding math on numpy arrays: every fold leaves x @ B unchanged."""

import numpy as np

from onnxqf.maths import fold
from onnxqf.maths.hadamard import rotation


def dense_kron(factors):
    out = np.ones((1, 1))
    for f in factors:
        out = np.kron(out, f)
    return out


def test_kron_apply_matches_dense():
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=(3, 3)), rng.normal(size=(4, 4)), rng.normal(size=(2, 2))]
    x = rng.normal(size=(5, 7, 24))
    np.testing.assert_allclose(fold.kron_apply(x, factors), x @ dense_kron(factors), atol=1e-10)


def test_rotation_of_residual_is_exact():
    rng = np.random.default_rng(1)
    x, B, W = rng.normal(size=(6, 12)), rng.normal(size=(12, 5)), rng.normal(size=(5, 12))
    Q = rotation(12, rng).matrix()
    # a reader: (x Q) (Q^T B) = x B ; a writer: x' W Q = (x' W) Q
    np.testing.assert_allclose((x @ Q) @ fold.rotate_input(B, Q), x @ B, atol=1e-10)
    xw = rng.normal(size=(6, 5))
    np.testing.assert_allclose(xw @ fold.rotate_output(W, Q), (xw @ W) @ Q, atol=1e-10)


def test_head_mix_input_inverts_the_online_transform():
    rng = np.random.default_rng(2)
    nh, dh = 3, 4
    R_dh, R_nh = rotation(dh, rng).matrix(), rotation(nh, rng).matrix()
    T = np.kron(np.eye(nh), R_dh) @ np.kron(R_nh, np.eye(dh))
    B = rng.normal(size=(nh * dh, 7))
    x = rng.normal(size=(5, nh * dh))
    np.testing.assert_allclose((x @ T) @ fold.head_mix_input(B, R_dh, R_nh, nh), x @ B, atol=1e-10)


def test_headwise_output_is_block_diagonal():
    rng = np.random.default_rng(3)
    R = rotation(4, rng).matrix()
    B = rng.normal(size=(6, 8))
    np.testing.assert_allclose(fold.headwise_output(B, R, 4), B @ np.kron(np.eye(2), R), atol=1e-12)


def test_scale_rows_and_cols():
    B = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(fold.scale_rows(B, np.array([2.0, 3.0])), [[0, 2, 4], [9, 12, 15]])
    np.testing.assert_array_equal(fold.scale_cols(B, np.array([1.0, 0.5, 2.0])), [[0, 0.5, 4], [3, 2, 10]])
