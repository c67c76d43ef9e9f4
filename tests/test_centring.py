"""The centring math (onnxqf.maths.centring) on numpy arrays: a LayerNorm is an RMSNorm of a centred stream."""

import numpy as np

from onnxqf.maths.centring import centre, centring_matrix
from onnxqf.maths.hadamard import rotation


def layer_norm(x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def rms_norm(x, eps=1e-5):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def test_centre_is_the_centring_matrix_along_an_axis():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(5, 8)) + 3.0
    np.testing.assert_allclose(centre(B, axis=1), B @ centring_matrix(8), atol=1e-12)
    np.testing.assert_allclose(centre(B, axis=0), centring_matrix(5) @ B, atol=1e-12)
    np.testing.assert_allclose(centre(B, axis=1).mean(axis=1), 0.0, atol=1e-12)
    C = centring_matrix(8)
    np.testing.assert_allclose(C @ C, C, atol=1e-12)  # a projection: centring twice is centring once
    np.testing.assert_allclose(C @ np.ones(8), 0.0, atol=1e-12)
    np.testing.assert_allclose(centre(np.array([1.0, 2.0, 6.0])), [-2.0, -1.0, 3.0])


def test_layernorm_is_rmsnorm_of_the_centred_vector():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6, 16)) * 3 + 2
    np.testing.assert_allclose(layer_norm(x), rms_norm(centre(x)), atol=1e-12)


def test_centred_writers_make_every_layernorm_an_rmsnorm_and_a_rotation_fold():
    """A toy stream: embedding rows plus two linear writers (with a bias). Centring the writers' outputs leaves
    every LayerNorm of the stream unchanged, makes it equal an RMSNorm, and then a rotation Q of the stream folds:
    RMSNorm(x Q) = RMSNorm(x) Q."""
    rng = np.random.default_rng(2)
    d = 16
    E = rng.normal(size=(10, d)) + rng.normal(size=(1, d))
    W1, W2, b2 = rng.normal(size=(d, d)), rng.normal(size=(d, d)), rng.normal(size=d)
    ids = rng.integers(0, 10, 7)

    def stream(E, W1, W2, b2, norm):
        x = E[ids]
        x = x + norm(x) @ W1
        x = x + norm(x) @ W2 + b2
        return norm(x)

    ref = stream(E, W1, W2, b2, layer_norm)
    Ec, W1c, W2c, b2c = centre(E, 1), centre(W1, 1), centre(W2, 1), centre(b2)
    np.testing.assert_allclose(stream(Ec, W1c, W2c, b2c, layer_norm), ref, atol=1e-10)
    np.testing.assert_allclose(stream(Ec, W1c, W2c, b2c, rms_norm), ref, atol=1e-10)
    Q = rotation(d, rng).matrix()
    # rotated: E Q, readers Q^T W, writers W Q (the writers here also read the normed stream)
    rotated = stream(Ec @ Q, Q.T @ W1c @ Q, Q.T @ W2c @ Q, b2c @ Q, rms_norm)
    np.testing.assert_allclose(rotated @ Q.T, ref, atol=1e-10)
    # without centring the RMSNorm is not the LayerNorm
    assert np.abs(stream(E, W1, W2, b2, rms_norm) - ref).max() > 1e-2
