"""The folding math, as pure functions on numpy arrays (float64 in, float64 out).

Weights are in ONNX MatMul layout: ``y = x @ B`` with ``B`` of shape [in, out]. A transform ``T``
applied to a linear's input (``x <- x @ T``) is undone in the weight by ``B <- T^-1 @ B``; for an
orthogonal ``T`` that is ``T^T @ B``. A transform of a linear's output (``y <- y @ T``) is
``B <- B @ T``, ``b <- b @ T``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["scale_rows", "scale_cols", "rotate_input", "rotate_output", "headwise_output", "headwise_vector",
           "head_mix_input", "kron_apply", "kron_input", "KronRotation", "smooth_rotate"]


def scale_rows(B: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) @ B: the input channel j of the linear is multiplied by s_j."""
    return B * s[:, None]


def scale_cols(B: np.ndarray, s: np.ndarray) -> np.ndarray:
    """B @ diag(s): output channel j is multiplied by s_j."""
    return B * s[None, :]


def rotate_input(B: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Weight for an input rotated by orthogonal Q (x <- x Q): Q^T B."""
    return Q.T @ B


def rotate_output(B: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Output rotated by Q (y <- y Q): B Q. Also for a bias row vector b: b Q."""
    return B @ Q


def headwise_output(B: np.ndarray, R: np.ndarray, head_dim: int) -> np.ndarray:
    """Apply R (head_dim x head_dim) to every head's block of output columns: B (I ⊗ R)."""
    n_in, n_out = B.shape
    assert n_out % head_dim == 0
    blocks = B.reshape(n_in, n_out // head_dim, head_dim)
    return (blocks @ R).reshape(n_in, n_out)


def headwise_vector(b: np.ndarray, R: np.ndarray, head_dim: int) -> np.ndarray:
    return headwise_output(b[None, :], R, head_dim)[0]


def head_mix_input(B: np.ndarray, R_dh: np.ndarray, R_nh: np.ndarray, num_heads: int) -> np.ndarray:
    """o_proj weight for the input transform T = (I_nh ⊗ R_dh)(R_nh ⊗ I_dh): T^T B.

    Computed without forming T: (R_nh ⊗ I)^T (I ⊗ R_dh)^T B.
    """
    n_in, n_out = B.shape
    head_dim = n_in // num_heads
    blocks = B.reshape(num_heads, head_dim, n_out)
    blocks = np.einsum("de,hdo->heo", R_dh, blocks)  # (I ⊗ R_dh)^T: R_dh^T per head block
    blocks = np.einsum("hg,hdo->gdo", R_nh, blocks)  # (R_nh ⊗ I)^T over the heads axis
    return blocks.reshape(n_in, n_out)


def _kron_contract(y: np.ndarray, lead: int, factors: list[np.ndarray], trail: int) -> np.ndarray:
    """``y`` viewed as ``[lead, f_1, ..., f_r, trail]``: every axis ``f_k`` contracted with ``F_k``'s first index.

    One GEMM per factor (a batched ``F_k^T @ y`` over the axes before it when the blocks are large,
    else ``y @ F_k`` with the axis moved last), so the cost is ``size · Σ f_k`` plus transposes.
    """
    sizes = [int(f.shape[0]) for f in factors]
    if all(_is_identity(F) for F in factors):
        return y.copy()
    for k, F in enumerate(factors):
        f = sizes[k]
        if _is_identity(F):  # e.g. the head-mixing stage's I_head_dim: nothing to do on that axis
            continue
        before = lead * int(np.prod(sizes[:k], dtype=np.int64))
        after = int(np.prod(sizes[k + 1:], dtype=np.int64)) * trail
        if after == 1:
            y = y.reshape(-1, f) @ F
        elif after >= _BATCHED_MIN:  # F^T @ y per leading index: few GEMMs, each large
            y = np.matmul(np.ascontiguousarray(F.T), y.reshape(before, f, after))
        else:  # many small blocks: bring the axis last, one GEMM, put it back
            t = np.ascontiguousarray(y.reshape(before, f, after).transpose(0, 2, 1)).reshape(-1, f) @ F
            y = np.ascontiguousarray(t.reshape(before, after, f).transpose(0, 2, 1))
    return y


_BATCHED_MIN = 256  # below this many columns per block, batched GEMMs are slower than a transpose


def _merge_trailing(factors: list[np.ndarray], upto: int) -> list[np.ndarray]:
    """Fold the innermost factors into one while their product stays <= ``upto`` (kron is associative):
    the innermost axis is one plain GEMM, every other axis costs two transposes."""
    fs = list(factors)
    while (len(fs) >= 2 and fs[-1].shape[0] * fs[-2].shape[0] <= upto
           and not (_is_identity(fs[-1]) or _is_identity(fs[-2]))):
        fs[-2:] = [np.kron(fs[-2], fs[-1])]
    return fs


def _is_identity(F: np.ndarray) -> bool:
    return F.shape[0] == F.shape[1] and bool(np.array_equal(F, np.eye(F.shape[0], dtype=F.dtype)))


def kron_apply(x: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """x @ kron(F_1, ..., F_r) along the last axis, without forming the Kronecker product."""
    x = np.asarray(x)
    lead = int(np.prod(x.shape[:-1], dtype=np.int64))
    return _kron_contract(np.ascontiguousarray(x), lead, list(factors), 1).reshape(x.shape)


def kron_input(B: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """Weight for an input rotated online by K = kron(F_1, ..., F_r) (x <- x K): K^T B, without forming K."""
    B = np.asarray(B)
    trail = int(np.prod(B.shape[1:], dtype=np.int64))
    return _kron_contract(np.ascontiguousarray(B), 1, list(factors), trail).reshape(B.shape)


class KronRotation:
    """An orthogonal ``M = diag(s_1) K_1 diag(s_2) K_2 ...`` with each ``K_i`` a Kronecker product of small
    factors (``s_i`` may be None), applied in ``O(n · Σ f)`` per row without forming ``M``.

    ``apply(x) = x @ M`` along the last axis; ``apply_input(B) = M^T @ B`` (the weight for an input
    rotated by M); ``matrix()`` the dense M.
    """

    def __init__(self, stages: list[tuple[np.ndarray | None, list[np.ndarray]]], *, merge_upto: int = 256):
        self.stages = [(None if s is None else np.asarray(s), _merge_trailing([np.asarray(f) for f in fs], merge_upto))
                       for s, fs in stages]
        self.n = int(np.prod([f.shape[0] for f in self.stages[0][1]]))

    def astype(self, dtype) -> "KronRotation":
        """The same rotation with its signs and factors in ``dtype`` (e.g. float32 for fast scoring)."""
        return KronRotation([(None if s is None else s.astype(dtype), [f.astype(dtype) for f in fs])
                             for s, fs in self.stages], merge_upto=0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        for signs, factors in self.stages:
            x = kron_apply(x if signs is None else x * signs, factors)
        return x

    def apply_input(self, B: np.ndarray) -> np.ndarray:
        for signs, factors in self.stages:
            B = kron_input(B if signs is None else B * signs[:, None], factors)
        return B

    def matrix(self) -> np.ndarray:
        return self.apply(np.eye(self.n))


def smooth_rotate(X: np.ndarray | None, B: np.ndarray | None, s: np.ndarray | None = None,
                  R: "np.ndarray | KronRotation | None" = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(X', B') = ((X / s) R, R^T diag(s) B)``: smoothing, then rotation (either may be None).

    ``X' B' = X B`` exactly; this is the transform every smoothing/rotation site applies, and the
    one the α search and ``onnxqf inspect`` measure. Either of X and B may be None (not computed).
    ``R`` is a dense matrix or a :class:`KronRotation`.
    """
    Xt = None if X is None else np.asarray(X, np.float64)
    Bt = None if B is None else np.asarray(B, np.float64)
    if s is not None:
        s = np.asarray(s, np.float64)
        Xt = None if Xt is None else Xt / s
        Bt = None if Bt is None else scale_rows(Bt, s)
    if isinstance(R, KronRotation):
        Xt = None if Xt is None else R.apply(Xt)
        Bt = None if Bt is None else R.apply_input(Bt)
    elif R is not None:
        Xt = None if Xt is None else Xt @ R
        Bt = None if Bt is None else rotate_input(Bt, R)
    return Xt, Bt
