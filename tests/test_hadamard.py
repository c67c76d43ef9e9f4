"""Tests for onnxqf.maths.hadamard (pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxqf.maths.fold import kron_apply
from onnxqf.maths.hadamard import (
    NoHadamardError,
    Rotation,
    hadamard_factors,
    hadamard_matrix,
    has_hadamard,
    paley1,
    paley2,
    random_orthogonal,
    rotation,
    sylvester,
    williamson,
)


def _kron(factors):
    out = np.ones((1, 1))
    for f in factors:
        out = np.kron(out, f)
    return out


def _assert_hadamard(h: np.ndarray, n: int) -> None:
    assert h.shape == (n, n)
    assert h.dtype == np.float64
    assert np.all(np.abs(h) == 1.0)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256])
def test_sylvester(n):
    _assert_hadamard(sylvester(n), n)


def test_sylvester_rejects_non_pow2():
    with pytest.raises(ValueError):
        sylvester(12)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 27, 43, 47, 59, 67, 83, 107, 243, 343])
def test_paley1(q):
    _assert_hadamard(paley1(q), q + 1)


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 29, 37, 41, 49, 81, 121, 125])
def test_paley2(q):
    _assert_hadamard(paley2(q), 2 * (q + 1))


@pytest.mark.parametrize("q", [3, 5, 9, 25, 27, 49, 81, 121, 125, 343])
def testjacobsthal_prime_powers(q):
    from onnxqf.maths.hadamard import jacobsthal

    j = jacobsthal(q)
    np.testing.assert_array_equal(np.diag(j), 0.0)
    np.testing.assert_array_equal(j.sum(axis=1), 0.0)  # (q-1)/2 squares, (q-1)/2 non-squares
    np.testing.assert_array_equal(j, j.T if q % 4 == 1 else -j.T)
    np.testing.assert_array_equal(j @ j.T, q * np.eye(q) - np.ones((q, q)))


@pytest.mark.parametrize("bad", [(paley1, 5), (paley1, 15), (paley1, 2), (paley2, 3), (paley2, 21), (paley2, 45)])
def test_paley_rejects(bad):
    fn, q = bad
    with pytest.raises(ValueError):
        fn(q)


def test_all_constructible_sizes_up_to_256():
    for n in list(range(4, 257, 4)) + [1, 2]:
        h = hadamard_matrix(n)
        assert (h is None) == (not has_hadamard(n))
        if h is not None:
            _assert_hadamard(h, n)
    missing = [n for n in range(4, 257, 4) if hadamard_matrix(n) is None]
    assert missing == [92, 116, 156, 184, 188, 232, 236]


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 52, 60, 108, 140, 576, 1536, 344, 172])
def test_named_sizes_dense(n):
    _assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("n", [3, 5, 6, 10, 18, 92, 156, 184, 11010])
def test_none(n):
    assert hadamard_matrix(n) is None
    assert hadamard_factors(n) is None
    assert not has_hadamard(n)


def test_williamson_172_is_hadamard_and_symmetric_blocks():
    h = williamson(43)
    _assert_hadamard(h, 172)
    for i in range(4):  # each circulant block is symmetric (Williamson's condition)
        blk = h[:43, 43 * i:43 * (i + 1)]
        np.testing.assert_array_equal(blk, blk.T)
    with pytest.raises(ValueError, match="no quadruple"):
        williamson(23)


def test_factors_with_a_chosen_block():
    assert [f.shape[0] for f in hadamard_factors(11008, block=344)] == [344, 16, 2]  # Paley I, q = 343
    q = _kron(hadamard_factors(688, block=344))
    np.testing.assert_allclose(q @ q.T, np.eye(688), atol=1e-12)
    np.testing.assert_allclose(np.abs(q) * math.sqrt(688), 1.0, atol=1e-12)
    for bad in (43, 100, 11008 * 2):
        with pytest.raises(ValueError, match="no construction"):
            hadamard_factors(11008, block=bad)


def test_cached_result_is_not_shared():
    a = hadamard_matrix(12)
    a[0, 0] = 7.0
    assert hadamard_matrix(12)[0, 0] == 1.0


@pytest.mark.parametrize(
    "n, sizes",
    [
        (1, [1]),
        (2, [2]),
        (128, [16, 8]),
        (1536, [12, 16, 8]),
        (576, [36, 16]),
        (13824, [108, 16, 8]),
        (14336, [28, 16, 16, 2]),
        (11008, [172, 16, 4]),  # 172 = 4 · 43: Williamson (Paley gives only 344)
    ],
)
def test_factor_sizes_and_orthonormal(n, sizes):
    fs = hadamard_factors(n)
    assert [f.shape[0] for f in fs] == sizes
    assert math.prod(sizes) == n
    for f in fs:
        k = f.shape[0]
        np.testing.assert_allclose(f @ f.T, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(np.abs(f) * math.sqrt(k), 1.0, atol=1e-12)  # ±1/√k


@pytest.mark.parametrize("n", [12, 64, 96, 576, 1536])
def test_factors_kron_equals_normalized_hadamard(n):
    fs = hadamard_factors(n, max_factor=8)
    assert all(f.shape[0] <= 8 for f in fs[1:])
    np.testing.assert_allclose(_kron(fs), hadamard_matrix(n) / math.sqrt(n), atol=1e-12)


def test_max_factor_validation():
    with pytest.raises(ValueError):
        hadamard_factors(64, max_factor=12)
    with pytest.raises(ValueError):
        hadamard_factors(64, max_factor=1)


@pytest.mark.parametrize("n", [12, 128, 576, 1536])
def test_apply_factors_matches_dense(n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, n))
    fs = hadamard_factors(n, max_factor=4)
    np.testing.assert_allclose(kron_apply(x, fs), x @ _kron(fs), atol=1e-10)


def test_apply_factors_generic_and_large():
    rng = np.random.default_rng(1)
    fs = [rng.standard_normal((k, k)) for k in (3, 5, 2)]
    x = rng.standard_normal((4, 30))
    np.testing.assert_allclose(kron_apply(x, fs), x @ _kron(fs), atol=1e-10)
    # 13824 without the dense matrix: norm preserved, matches an explicit two-step product.
    fs = hadamard_factors(13824)
    x = rng.standard_normal((2, 13824))
    y = kron_apply(x, fs)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    z = (x.reshape(2, 108, 128).transpose(0, 2, 1) @ fs[0]).transpose(0, 2, 1) @ (hadamard_matrix(128) / math.sqrt(128))
    np.testing.assert_allclose(y, z.reshape(2, 13824), atol=1e-10)
    with pytest.raises(ValueError):
        kron_apply(x[:, :100], fs)


def test_random_orthogonal():
    q = random_orthogonal(50, np.random.default_rng(0))
    assert q.dtype == np.float64
    np.testing.assert_allclose(q @ q.T, np.eye(50), atol=1e-12)
    assert not np.allclose(q, random_orthogonal(50, np.random.default_rng(1)))


@pytest.mark.parametrize("n", [1, 2, 12, 64, 96, 576, 1536])
def test_rotation_orthogonal_hadamard(n):
    r = rotation(n, np.random.default_rng(0))
    assert isinstance(r, Rotation)
    assert r.kind == "hadamard"
    assert r.signs.shape == (n,) and r.signs.dtype == np.float64
    assert set(np.unique(r.signs)) <= {-1.0, 1.0}
    q = r.matrix()
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert r.dense_cost == n * sum(f.shape[0] for f in r.factors)


def test_rotation_signs_before_mixing():
    n = 1536
    r = rotation(n, np.random.default_rng(3))
    q = r.matrix()
    h = hadamard_matrix(n) / math.sqrt(n)
    np.testing.assert_allclose(q, r.signs[:, None] * h, atol=1e-12)  # Q = D @ H
    for i in (0, 1, 7, 500, n - 1):
        np.testing.assert_allclose(q[i, :], r.signs[i] * h[i, :], atol=1e-12)
    x = np.random.default_rng(4).standard_normal((3, n))
    np.testing.assert_allclose(r.apply(x), x @ q, atol=1e-10)


@pytest.mark.parametrize(
    "n, kind, sizes",
    [
        (9, "orthogonal", [9]),
        (18, "orthogonal", [18]),
        (92, "orthogonal", [92]),
        (184, "hadamard+orthogonal(92)", [92, 2]),
        (4672, "hadamard+orthogonal(292)", [292, 16]),  # 73 * 64
    ],
)
def test_rotation_fallback(n, kind, sizes):
    r = rotation(n, np.random.default_rng(0))
    assert r.kind == kind
    assert [f.shape[0] for f in r.factors] == sizes
    for f in r.factors:
        np.testing.assert_allclose(f @ f.T, np.eye(f.shape[0]), atol=1e-12)
    if n <= 256:
        q = r.matrix()
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


def test_rotation_fallback_error():
    for n in (92, 184, 18):
        with pytest.raises(NoHadamardError, match=f"n={n}") as exc:
            rotation(n, np.random.default_rng(0), fallback="error")
        assert isinstance(exc.value, ValueError)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError):
        rotation(12, 0, fallback="nope")


def test_rotation_seeds():
    a = rotation(64, np.random.default_rng(0)).matrix()
    b = rotation(64, np.random.default_rng(1)).matrix()
    c = rotation(64, np.random.default_rng(0)).matrix()
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    a = rotation(184, np.random.default_rng(0)).matrix()
    b = rotation(184, np.random.default_rng(1)).matrix()
    assert not np.allclose(a, b)


def test_rotation_is_frozen():
    r = rotation(12, 0)
    with pytest.raises(AttributeError):
        r.kind = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        r.signs[0] = 5.0


# -- online rotations as graph nodes ------------------------------------------------------------------


def _random_factor(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((size, size)))[0]


def test_online_style_parse():
    from onnxqf.graph.edit import OnlineStyle

    assert OnlineStyle.parse("batched:64") == OnlineStyle(64, True)
    assert OnlineStyle.parse("cycle") == OnlineStyle()
    for bad in ("fast", "batched:x", "cycle:1"):
        with pytest.raises(ValueError):
            OnlineStyle.parse(bad)


@pytest.mark.parametrize("pattern, max_group, n_transposes", [
    ([16, 16, 16], 512, 2),          # 4096-style: groups 256 x 16
    ([16, 16, 16], 16, 3),           # no merging: three groups
    ([12, None], 512, 2),            # head mixing: dense heads, identity head_dim
    ([None, 8], 512, 0),             # identity then dense: one MatMul on the last axis
    ([6, None, 4, 2], 512, 3),       # dense, identity, dense(8)
    ([20], 512, 0),                  # one dense factor
])
@pytest.mark.parametrize("batched", [False, True], ids=["cycle", "batched"])
def test_online_rotation_nodes_match_kron(pattern, max_group, n_transposes, batched):
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxqf.graph.edit import rotate_value_online
    from onnxqf.maths.hadamard import online_groups

    rng = np.random.default_rng(0)
    sizes = [abs(p) if p is not None else 5 for p in pattern]
    factors = [None if p is None else _random_factor(p, rng) for p in pattern]
    n = int(np.prod(sizes))
    groups = online_groups(factors, sizes, max_group)
    dense = [np.eye(s) if f is None else f for f, s in zip(factors, sizes)]
    kron = dense[0]
    for f in dense[1:]:
        kron = np.kron(kron, f)
    merged = [np.eye(s) if f is None else f for s, f in groups]
    kron_groups = merged[0]
    for f in merged[1:]:
        kron_groups = np.kron(kron_groups, f)
    np.testing.assert_allclose(kron_groups, kron, atol=1e-12)
    assert all(s <= max_group or f is None or len(groups) == 1 or s in sizes for s, f in groups)

    x = ir.Value(name="x", shape=ir.Shape([2, "T", n]), type=ir.TensorType(ir.DataType.FLOAT))
    identity = ir.node("Identity", [x])
    graph = ir.Graph([x], identity.outputs, nodes=[identity], opset_imports={"": 18}, name="g")
    identity.outputs[0].name = "y"
    rotate_value_online(graph, x, factors, ir.DataType.FLOAT, "rot", sizes=sizes, max_group=max_group, batched=batched)
    assert sum(node.op_type == "Transpose" for node in graph) == (0 if batched else n_transposes)
    if batched:  # one MatMul per dense group, none for identities
        assert sum(node.op_type == "MatMul" for node in graph) == sum(f is not None for _, f in groups)
    model = ir.Model(graph, ir_version=10)
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    xs = rng.standard_normal((2, 3, n)).astype(np.float32)
    (y,) = sess.run(None, {"x": xs})
    np.testing.assert_allclose(y, xs @ kron, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, kron_apply(xs, dense), rtol=1e-4, atol=1e-4)
