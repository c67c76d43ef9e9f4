"""GPTQ weight rounding (Frantar et al., 2022), on numpy arrays, for int8 per-output-channel weights.

Round-to-nearest rounds each weight on its own. GPTQ rounds the input rows of B one at a time and
pushes each row's rounding error onto the rows not yet rounded, weighted by the inverse Hessian
``H = X^T X`` of the linear's calibration inputs, so that ``||X B - X Q(B)||`` (not ``||B - Q(B)||``)
is what gets minimized. The per-output-channel scales are fixed first (as RTN would choose them),
so the result is stored exactly like an RTN-quantized weight.

Weights here are ONNX MatMul layout ``B [in, out]``; ``H`` is ``[in, in]``. Several linears that
read the same input (q/k/v, gate/up) share ``H`` and are rounded together (columns concatenated).
"""

from __future__ import annotations

import numpy as np

from onnxqf import qmath


def prepare_hessian(H: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of H^-1 with dampening, dead-channel mask)."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))
    inv = np.linalg.inv(H)
    inv = (inv + inv.T) / 2
    U = np.linalg.cholesky(inv).T  # upper: U^T U = H^-1
    return U, dead


def gptq_round(B: np.ndarray, H: np.ndarray, quantize_row, *, damp: float = 0.01, block: int = 128,
               act_order: bool = True) -> np.ndarray:
    """The GPTQ loop with a pluggable rounding of one row; returns the rounded ``B`` (float64, [in, out]).

    ``quantize_row(row, w, ahead)`` gets the row's index in ``B`` (original order), its current
    (error-updated) values ``w [out]`` and ``ahead``: the current values of the rows that follow in
    processing order within the same lazy block of ``block`` rows, starting with ``w`` itself (a
    quantizer that picks scales per group of rows can compute them there when a group starts). It
    returns the row as stored (dequantized, float64). Rows are visited by decreasing ``diag(H)``
    with ``act_order``, else in order.
    """
    B = np.asarray(B, np.float64)
    n_in = B.shape[0]
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n_in)
    H = np.asarray(H, np.float64)[np.ix_(order, order)]
    W = B[order].copy()
    U, dead = prepare_hessian(H, damp)
    W[dead] = 0.0
    Q = np.zeros_like(W)
    for start in range(0, n_in, block):
        end = min(start + block, n_in)
        Wb = W[start:end].copy()
        Ub = U[start:end, start:end]
        Err = np.zeros_like(Wb)
        for i in range(end - start):
            w = Wb[i]
            q = quantize_row(int(order[start + i]), w, Wb[i:])
            Q[start + i] = q
            e = (w - q) / Ub[i, i]
            Wb[i + 1 :] -= np.outer(Ub[i, i + 1 :], e)
            Err[i] = e
        W[end:] -= U[start:end, end:].T @ Err
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n_in)
    return Q[inverse]


def gptq_quantize(B: np.ndarray, H: np.ndarray, bits: int = 8, scale: np.ndarray | None = None, damp: float = 0.01,
                  block: int = 128, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(q [in, out] int8, scale [out]) for ``B`` given the input Hessian ``H`` (per-output-channel scales)."""
    B = np.asarray(B, np.float64)
    qmax = qmath.qmax_for_bits(bits)
    if scale is None:
        _, scale = qmath.quantize_weight_per_channel(B, bits=bits)
    scale = np.asarray(scale, np.float64)

    def rtn(row, w, ahead):
        return np.clip(np.rint(w / scale), -qmax, qmax) * scale

    Q = gptq_round(B, H, rtn, damp=damp, block=block, act_order=act_order)
    q = np.clip(np.rint(Q / scale), -qmax, qmax).astype(np.int8 if bits <= 8 else np.int16)
    return q, scale


class HessianAccumulator:
    """Streaming ``X^T X`` (float64) and token count for one activation site."""

    def __init__(self) -> None:
        self.H: np.ndarray | None = None
        self.count = 0

    def update(self, X: np.ndarray) -> None:
        X = np.asarray(X, np.float64).reshape(-1, X.shape[-1])
        if self.H is None:
            self.H = np.zeros((X.shape[1], X.shape[1]))
        self.H += X.T @ X
        self.count += X.shape[0]
