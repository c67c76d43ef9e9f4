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

import dataclasses
from typing import Callable, Iterator

import numpy as np

from onnxqf.maths import qmath

__all__ = ["FLOAT64_MAX_CHANNELS", "hessian_dtype", "PreparedHessian", "prepare", "hessian_of", "column_chunks",
           "gptq_round", "gptq_quantize", "HessianAccumulator"]

#: Hessians of more input channels than this are accumulated and factored in float32 (as GPTQ's
#: reference code does for all): Llama-2-7B's down_proj (11008) takes 485 MB instead of 970 MB per
#: copy, its other sites (4096) 67 MB, which is what lets a 7B layer be calibrated and rounded
#: within 2.5 GB (onnxqf.graph.store). Smaller ones (every SmolLM2 site) stay float64.
FLOAT64_MAX_CHANNELS = 2048


def hessian_dtype(n: int):
    return np.float64 if n <= FLOAT64_MAX_CHANNELS else np.float32


@dataclasses.dataclass(eq=False)
class PreparedHessian:
    """What the GPTQ loop needs of ``H``, computed once per site and shared by its linears and column
    chunks (the loop treats every output column on its own, so splitting B by columns is exact)."""

    order: np.ndarray  # the rows' processing order
    U: np.ndarray  # upper Cholesky factor of the damped H^-1, rows and columns in ``order``
    dead: np.ndarray  # channels without signal (in ``order``)
    diag: np.ndarray  # diag(H), original order


def prepare(H: np.ndarray | Callable[[], np.ndarray], damp: float = 0.01, act_order: bool = True) -> PreparedHessian:
    """Dampen, invert, order and factor ``H``.

    ``H`` may be a function that returns a fresh copy of it each time it is called (such as
    :meth:`onnxqf.calib.layerwise.LazyHessians.get` for one site): that copy is then dampened and factored
    in place, with no other reference to it alive, so above :data:`FLOAT64_MAX_CHANNELS` channels the
    float32 factorization needs one n x n workspace beside it (PyTorch; 485 MB for Llama-2-7B's
    down_proj). An array is left as it is (copied). If float32 is not enough (not positive definite
    after damping), the factor is computed again in float64 from the array, or from a second call.
    Ordering the inverse equals inverting the ordered H.
    """
    reload = H if callable(H) else None
    consume = reload is not None
    if consume:
        H = reload()
    n = H.shape[0]
    diag = np.array(np.diag(H), np.float64)
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    dtype = hessian_dtype(n)
    original = None if consume else H
    U = None
    if dtype == np.float32:
        work = H if consume and H.dtype == dtype else np.array(H, dtype=dtype, copy=True)
        del H
        work, dead = _conditioned(work, damp, order if act_order else None)
        U = _torch_upper_factor(work)
        del work
        if U is None or not np.isfinite(U).all():
            U = None
            H = original if original is not None else reload()
    if U is None:
        H, dead = _conditioned(np.array(H, dtype=np.float64, copy=True), damp, order if act_order else None)
        inv = np.linalg.inv(H)
        del H
        U = _upper_factor(inv)
    return PreparedHessian(order, U, dead[order], diag)


def hessian_of(hessians, name: str | None) -> np.ndarray | Callable[[], np.ndarray] | None:
    """What :func:`prepare` takes for site ``name`` of a pass's ``hessians``: None if it has none; for a
    container that hands out a fresh copy per ``get`` (``hands_out_copies``, such as
    :class:`onnxqf.calib.layerwise.LazyHessians`) a function that fetches one, so that :func:`prepare` can
    overwrite it; else the array itself."""
    if name is None or hessians is None or name not in hessians:
        return None
    if getattr(hessians, "hands_out_copies", False):
        return lambda: hessians.get(name)
    return hessians.get(name)


def _conditioned(H: np.ndarray, damp: float, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(H dampened in place — unit diagonal for dead channels, then ``damp`` x the mean diagonal added —
    with rows and columns in ``order`` if given; the dead-channel mask in the original order)."""
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))
    return (H if order is None else H[np.ix_(order, order)]), dead


def _torch_upper_factor(H: np.ndarray) -> np.ndarray | None:
    """Upper U with U^T U = H^-1 through PyTorch's Cholesky routines (H = L L^T, H^-1 from L, then its
    upper factor), when PyTorch is installed: for a 7B down_proj (11008 channels, float32) ~20x faster
    than numpy's general inverse. Computed in ``H``'s own memory (overwritten; one n x n workspace beside
    it). None if PyTorch is missing or H is not positive definite in its dtype (``H`` is then garbage)."""
    try:
        import torch
    except ImportError:
        return None
    t = torch.from_numpy(np.ascontiguousarray(H))
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(t, out=(t, info))
    if int(info):
        return None
    torch.cholesky_inverse(t, out=t)
    torch.linalg.cholesky_ex(t, upper=True, out=(t, info))
    if int(info):
        return None
    return t.numpy()


def _upper_factor(inv: np.ndarray) -> np.ndarray:
    """Upper U with U^T U = inv (symmetrized in place first)."""
    inv += inv.T
    inv *= 0.5
    L = np.linalg.cholesky(inv)
    del inv
    return np.ascontiguousarray(L.T)


def column_chunks(B: np.ndarray, max_bytes: int = 64 << 20,
                  align: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(columns, B[:, columns] as float64) in slices whose float64 working copies stay within ``max_bytes``
    each (B may be stored in a narrower dtype: only one slice is float64 at a time); ``align``: slices
    of a multiple of this many columns (whole heads), at least one."""
    n_in, n_out = B.shape
    step = max(align or 64, min(n_out, max_bytes // (8 * max(1, n_in))))
    if align:
        step -= step % align
    for c in range(0, n_out, step):
        cols = slice(c, min(n_out, c + step))
        yield cols, np.asarray(B[:, cols], np.float64)


def gptq_round(B: np.ndarray, H: np.ndarray | PreparedHessian, quantize_row, *, damp: float = 0.01, block: int = 128,
               act_order: bool = True, outer: int = 512) -> np.ndarray:
    """The GPTQ loop with a pluggable rounding of one row; returns the rounded ``B`` (float64, [in, out]).

    ``quantize_row(row, w, ahead)`` gets the row's index in ``B`` (original order), its current
    (error-updated) values ``w [out]`` and ``ahead``: the current values of the rows that follow in
    processing order within the same lazy block of ``block`` rows, starting with ``w`` itself (a
    quantizer that picks scales per group of rows can compute them there when a group starts). It
    returns the row as stored (dequantized, float64). Rows are visited by decreasing ``diag(H)``
    with ``act_order``, else in order. ``H`` may be a :class:`PreparedHessian` (then ``damp`` and
    ``act_order`` are the ones it was prepared with).

    The error feedback is applied lazily on two levels (the result is the same up to floating-point
    order): row by row inside a ``block``, one matrix product per ``block`` inside an ``outer``
    block, one per ``outer`` block for the rows after it. Without the outer level every ``block``
    would rewrite all the rows still to come: for a 7B down_proj that is ~10x the memory traffic.
    The work arrays are in the factor's dtype (float32 for Hessians above
    :data:`FLOAT64_MAX_CHANNELS` channels, as GPTQ's reference code computes), float64 otherwise.
    """
    n_in = B.shape[0]
    p = H if isinstance(H, PreparedHessian) else prepare(H, damp, act_order)
    order, U, dead = p.order, p.U, p.dead
    work = np.float32 if U.dtype == np.float32 else np.float64
    W = np.asarray(B, work)[order]
    W[dead] = 0.0
    Q = np.zeros(W.shape, np.float64)
    outer = max(block, outer - outer % block)
    for ostart in range(0, n_in, outer):
        oend = min(ostart + outer, n_in)
        Err_o = np.empty((oend - ostart, W.shape[1]), work)
        for start in range(ostart, oend, block):
            end = min(start + block, oend)
            Wb = W[start:end].copy()
            Ub = U[start:end, start:end]
            Err = Err_o[start - ostart:end - ostart]
            for i in range(end - start):
                w = Wb[i]
                q = quantize_row(int(order[start + i]), np.asarray(w, np.float64), Wb[i:])
                Q[start + i] = q
                e = (w - q) / Ub[i, i]
                Wb[i + 1 :] -= np.outer(Ub[i, i + 1 :], e)
                Err[i] = e
            if end < oend:
                W[end:oend] -= U[start:end, end:oend].T @ Err
        if oend < n_in:
            W[oend:] -= U[ostart:oend, oend:].T @ Err_o
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n_in)
    return Q[inverse]


def gptq_quantize(B: np.ndarray, H: np.ndarray | PreparedHessian, bits: int = 8, scale: np.ndarray | None = None,
                  damp: float = 0.01, block: int = 128, act_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
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
    """Streaming ``X^T X`` (float64, float32 above :data:`FLOAT64_MAX_CHANNELS`) and token count for one
    activation site."""

    def __init__(self) -> None:
        self.H: np.ndarray | None = None
        self.count = 0

    def update(self, X: np.ndarray) -> None:
        n = X.shape[-1]
        dtype = hessian_dtype(n)
        X = np.asarray(X, dtype).reshape(-1, n)
        if self.H is None:
            self.H = np.zeros((n, n), dtype)
        # in column blocks: no n x n temporary (485 MB for a 7B down_proj) beside the accumulator
        step = max(256, (32 << 20) // (X.dtype.itemsize * n))
        for c in range(0, n, step):
            self.H[:, c:c + step] += X.T @ X[:, c:c + step]
        self.count += X.shape[0]
