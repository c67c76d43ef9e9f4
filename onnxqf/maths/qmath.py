"""Quantization math (pure numpy) shared by graph passes and analysis.

Conventions
-----------
* Activations ``X`` are ``[tokens, channels]`` (any leading dims are allowed where
  noted; the last axis is the channel axis).
* Weights ``B`` use the ONNX ``MatMul`` layout ``[in, out]`` so that ``y = X @ B``.
  "Per output channel" therefore means per *column* of ``B``.
* Everything is computed in float64 internally, except :func:`dynamic_quantize_linear`,
  which reproduces ONNX ``DynamicQuantizeLinear`` float32 semantics exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "qmax_for_bits",
    "quantize_weight_per_channel",
    "dequantize_weight",
    "fake_quant_weight",
    "fake_quant_per_token",
    "dynamic_quantize_linear",
    "fake_quant_per_tensor_asym_uint8",
    "asymmetric_codes_f16",
    "asymmetric_dequant_f32",
    "smooth_scales",
    "weight_row_absmax",
]


def qmax_for_bits(bits: int) -> int:
    """Largest symmetric integer level, ``2**(bits-1) - 1`` (127 for 8 bits)."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    return (1 << (bits - 1)) - 1


def _int_dtype(bits: int) -> type:
    """Smallest signed integer dtype holding ``[-qmax, qmax]``."""
    if bits <= 8:
        return np.int8
    if bits <= 16:
        return np.int16
    if bits <= 32:
        return np.int32
    return np.int64


def _safe_scale(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """``absmax / qmax`` with zero (or non-finite) ranges mapped to scale 1."""
    absmax = np.asarray(absmax, dtype=np.float64)
    ok = np.isfinite(absmax) & (absmax > 0)
    return np.where(ok, absmax / qmax, 1.0)


def _quant_cols(B: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest (half to even) and clip ``B / scale`` column-wise (float64 result)."""
    return np.clip(np.rint(B / scale[None, :]), -qmax, qmax)


def quantize_weight_per_channel(
    B: np.ndarray,
    bits: int = 8,
    clip_search: bool = False,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of a ``[in, out]`` MatMul weight.

    ``scale[k] = clip_k * max|B[:, k]| / qmax`` and ``q = clip(round(B / scale), -qmax, qmax)``.
    Without ``clip_search`` ``clip_k = 1``. With it, each column tries the ratios
    ``linspace(min_ratio, 1, grid)`` (ratio 1 is always included) and keeps the one with the
    smallest squared reconstruction error of that column, so the result is never worse than
    no clipping. All-zero columns get scale 1 and q = 0.

    Returns ``(q, scale)``: ``q`` is int8 for ``bits <= 8`` (wider ints otherwise) with shape
    ``[in, out]``; ``scale`` is float64 ``[out]``.
    """
    B = np.asarray(B, dtype=np.float64)
    if B.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {B.shape}")
    qmax = qmax_for_bits(bits)
    amax = np.max(np.abs(B), axis=0) if B.shape[0] else np.zeros(B.shape[1])
    scale = _safe_scale(amax, qmax)
    qf = _quant_cols(B, scale, qmax)

    if clip_search and B.size:
        best_err = np.sum((qf * scale[None, :] - B) ** 2, axis=0)
        ratios = np.linspace(float(min_ratio), 1.0, int(grid)) if grid > 0 else np.ones(0)
        nonzero = amax > 0
        for r in ratios:
            if r <= 0 or r >= 1.0:
                continue  # ratio 1 is the starting point; non-positive ratios are meaningless
            s_r = np.where(nonzero, _safe_scale(amax * r, qmax), 1.0)
            q_r = _quant_cols(B, s_r, qmax)
            err = np.sum((q_r * s_r[None, :] - B) ** 2, axis=0)
            better = err < best_err
            if np.any(better):
                best_err = np.where(better, err, best_err)
                scale = np.where(better, s_r, scale)
                qf[:, better] = q_r[:, better]

    return qf.astype(_int_dtype(bits)), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reconstruct ``q * scale`` (per output column) in float64."""
    return np.asarray(q, dtype=np.float64) * np.asarray(scale, dtype=np.float64)[None, :]


def fake_quant_weight(B: np.ndarray, bits: int = 8, clip_search: bool = False) -> np.ndarray:
    """Quantize-dequantize ``B`` per output channel (float64 ``[in, out]``)."""
    q, scale = quantize_weight_per_channel(B, bits=bits, clip_search=clip_search)
    return dequantize_weight(q, scale)


def fake_quant_per_token(X: np.ndarray, bits: int = 8) -> np.ndarray:
    """Symmetric per-row (per-token) quantize-dequantize along the last axis.

    ``scale = max|row| / qmax`` (zero rows use scale 1 and stay zero), rounding is
    half-to-even like numpy / ONNX, and levels are clipped to ``[-qmax, qmax]``.
    """
    X = np.asarray(X, dtype=np.float64)
    qmax = qmax_for_bits(bits)
    if X.size == 0:
        return X.copy()
    scale = _safe_scale(np.max(np.abs(X), axis=-1, keepdims=True), qmax)
    return np.clip(np.rint(X / scale), -qmax, qmax) * scale


def dynamic_quantize_linear(X: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """Exact numpy model of ONNX ``DynamicQuantizeLinear`` (uint8, per tensor).

    Arithmetic is float32 like the operator: the range ``[min(0, min x), max(0, max x)]``
    gives ``scale = (max - min) / 255``, ``zero_point = saturate(round(-min / scale))`` and
    ``y = saturate(round(x / scale) + zero_point)`` with round-half-to-even. An all-zero
    (zero-range) input uses ``scale = 1`` (as ONNX Runtime does) instead of dividing by 0.

    Returns ``(y uint8 [same shape], scale float32 scalar, zero_point uint8 scalar)``.
    """
    x = np.asarray(X, dtype=np.float32)
    if x.size:
        lo = np.float32(min(np.float32(0.0), x.min()))
        hi = np.float32(max(np.float32(0.0), x.max()))
    else:
        lo = hi = np.float32(0.0)
    if hi == lo:
        scale = np.float32(1.0)
    else:
        scale = np.float32((hi - lo) / np.float32(255.0))
    zp_f = np.float32(np.float32(0.0) - lo / scale)
    zp = np.uint8(np.rint(np.clip(zp_f, np.float32(0.0), np.float32(255.0))))
    with np.errstate(over="ignore", invalid="ignore"):
        yf = np.rint(x / scale) + np.float32(zp)
    y = np.clip(yf, 0.0, 255.0).astype(np.uint8)
    return y, scale, zp


def fake_quant_per_tensor_asym_uint8(X: np.ndarray) -> np.ndarray:
    """``DynamicQuantizeLinear`` followed by dequantization: ``(y - zp) * scale`` (float64)."""
    y, scale, zp = dynamic_quantize_linear(X)
    return (y.astype(np.float64) - float(zp)) * float(scale)


#: the floor of the asymmetric codes' float16 step (int8-token-asym's float16 graph)
FP16_ASYM_STEP_FLOOR = np.float16(1e-4)


def asymmetric_codes_f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy model of ``int8-token-asym``'s codes of float16 rows (:func:`onnxqf.lowering.w8a8.asymmetric_codes` with
    ``code_offset`` 128), every step in float16 as its graph takes it (and as onnxqf.W8A8Linear's asymmetric codes
    do, kernels/src/quant_row.cuh): ``hi = max(max x, 0)``, ``lo = min(min x, 0)``, ``s = max((hi - lo) / 255,
    1e-4)``, ``zp = round(-lo / s)``, codes ``clip(round(x / s) + zp, 0, 255) - 128``; round half to even. Exact where
    each float16 operation is correctly rounded (ONNX's reference evaluator, the host); on a GPU both the graph's Div
    and the op's are CUDA's ``__hdiv`` (a reciprocal approximation, corrected only for tiny quotients), which may
    round a rare quotient the other way: there the op equals the graph, and this model to a code.

    Returns ``(codes int8 [x's shape], s float16 [..., 1], zp float16 [..., 1])``.
    """
    x = np.asarray(x, dtype=np.float16)
    f16 = np.float16
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        hi = np.maximum(x.max(axis=-1, keepdims=True), f16(0))
        lo = np.minimum(x.min(axis=-1, keepdims=True), f16(0))
        s = np.maximum(((hi - lo).astype(f16) / f16(255)).astype(f16), FP16_ASYM_STEP_FLOOR).astype(f16)
        zp = np.rint((-lo / s).astype(f16)).astype(f16)
        c = np.clip(np.rint((x / s).astype(f16)).astype(np.float32) + zp.astype(np.float32), 0, 255)
    return (c - 128).astype(np.int8), s, zp


def asymmetric_dequant_f32(acc: np.ndarray, s: np.ndarray, zp: np.ndarray, colsum: np.ndarray,
                           wscale: np.ndarray) -> np.ndarray:
    """``int8-token-asym``'s float32 rescale of the int32 products ``acc [.., N]`` of its codes: ``((acc - (zp - 128)
    * colsum) * s) * wscale``, each step rounded to float32 on its own (``s``, ``zp`` per token ``[.., 1]``; ``colsum``
    the int8 weights' per-channel sums and ``wscale`` their steps, ``[N]``)."""
    f32 = np.float32
    z = (np.asarray(zp).astype(f32) - f32(128)).astype(f32)
    correction = (z * np.asarray(colsum, f32)).astype(f32)
    centred = (np.asarray(acc).astype(f32) - correction).astype(f32)
    return ((centred * np.asarray(s).astype(f32)).astype(f32) * np.asarray(wscale, f32)).astype(f32)


def weight_row_absmax(B: np.ndarray) -> np.ndarray:
    """``max_k |B[j, k]|`` for each input row ``j`` of a ``[in, out]`` weight (float64 ``[in]``)."""
    B = np.asarray(B, dtype=np.float64)
    if B.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {B.shape}")
    if B.shape[1] == 0:
        return np.zeros(B.shape[0])
    return np.max(np.abs(B), axis=1)


def smooth_scales(
    act_absmax: np.ndarray,
    weight_absmax: np.ndarray,
    alpha: float = 0.5,
    eps: float = 1e-5,
    clamp: tuple[float, float] = (1e-5, 1e5),
) -> np.ndarray:
    """SmoothQuant per-input-channel factors ``s_j = max|X_j|**alpha / max|B_j|**(1 - alpha)``.

    The smoothed layer is ``(X / s) @ (diag(s) B)``. Stats are floored at ``eps``; channels
    whose activation or weight statistic is zero, negative or non-finite get ``s = 1``; the
    result is clamped to ``clamp`` (default ``[1e-5, 1e5]``). Returns float64 ``[in]``.
    """
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    if a.shape != w.shape:
        raise ValueError(f"shape mismatch: act {a.shape} vs weight {w.shape}")
    valid = np.isfinite(a) & np.isfinite(w) & (a > 0) & (w > 0)
    a_ = np.maximum(np.where(valid, a, 1.0), eps)
    w_ = np.maximum(np.where(valid, w, 1.0), eps)
    s = np.exp(alpha * np.log(a_) - (1.0 - alpha) * np.log(w_))
    s = np.clip(s, clamp[0], clamp[1])
    return np.where(valid, s, 1.0)
