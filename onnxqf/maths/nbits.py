"""Block-wise low-bit weight quantization in ONNX Runtime's ``com.microsoft.MatMulNBits`` layout (numpy).

A MatMul weight ``B [K, N]`` (ONNX layout, ``y = x @ B``) is cut along K into ``n_blocks =
ceil(K / block_size)`` blocks; every (output column n, block b) pair has its own scale, and, when
asymmetric, its own zero point. Codes are unsigned ``bits``-bit integers ``c`` in ``[0, 2^bits - 1]``
and the weight they stand for is ``(c - zero_point) * scale``.

MatMulNBits' inputs (checked byte for byte against onnxruntime's own quantizer, see tests/test_nbits.py):

- ``B``: uint8 ``[N, n_blocks, blob_size]``, ``blob_size = block_size * bits / 8``. Row n of the
  transposed weight, block by block; within a byte the element with the lower K index sits in the
  low bits (4-bit: ``byte = c[2i] | c[2i+1] << 4``). K is zero-padded (code 0) up to a whole block.
- ``scales``: ``[N, n_blocks]`` (or flat ``[N * n_blocks]``) in the activation's float type.
- ``zero_points`` (optional): uint8, the codes packed like B along the block axis, per column padded
  to whole bytes: ``[N, ceil(n_blocks * bits / 8)]``. Absent means ``2^(bits - 1)`` (8 for 4 bits).
- attributes ``K``, ``N``, ``bits``, ``block_size`` (a power of two >= 16), ``accuracy_level``.

Symmetric quantization uses ONNX Runtime's convention, which spends all ``2^bits`` levels: the
block's element of largest magnitude ``m`` (with its sign) maps to the lowest level ``-2^(bits-1)``,
``scale = m / -2^(bits-1)`` (so scales may be negative), codes ``clip(round(w / scale), -2^(bits-1),
2^(bits-1) - 1) + 2^(bits-1)``, no zero-point input. Asymmetric uses ``[min(w, 0), max(w, 0)]``:
``scale = (max - min) / (2^bits - 1)``, ``zero_point = round(-min / scale)``.

Scales are rounded to their storage type (float32 or float16) *before* the codes are chosen, so that
what onnxruntime dequantizes is exactly what the rounding (RTN or GPTQ) aimed at.

Block-wise GPTQ (:func:`gptq_blockwise`) rounds rows of B in K order with
:func:`onnxqf.maths.gptq.gptq_round`; each block's scales are computed from the *updated* weights when
the first row of the block is reached (or, with ``act_order``, from the original weights before
rounding starts: blocks are fixed groups of K indices while rows are visited out of order).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxqf.maths.gptq import PreparedHessian, gptq_round
from onnxqf.maths.layout import transpose_copy

__all__ = ["BITS", "BLOCK_SIZES", "n_blocks", "blob_size", "check", "BlockQuant", "concat_columns", "pack_codes",
           "unpack_codes", "pack_zero_points", "unpack_zero_points", "dequantize_packed", "block_scales",
           "quantize_blockwise", "refit_scales", "gptq_blockwise", "output_error"]

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


def n_blocks(K: int, block_size: int) -> int:
    return -(-K // block_size)


def blob_size(bits: int, block_size: int) -> int:
    return block_size * bits // 8


def check(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, not {block_size}")


@dataclasses.dataclass
class BlockQuant:
    """A block-wise quantized ``[K, N]`` weight.

    ``codes`` uint8 ``[K, N]`` (unsigned levels), ``scales`` float64 ``[n_blocks, N]`` holding values
    exactly representable in ``scale_dtype``, ``zero_points`` uint8 ``[n_blocks, N]`` or None for
    symmetric (implicitly ``2^(bits-1)``).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    scale_dtype: type = np.float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def zero_point_array(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """``(codes - zero_point) * scale`` as float64 ``[K, N]``."""
        K = self.codes.shape[0]
        rows = np.arange(K) // self.block_size
        zp = self.zero_point_array().astype(np.float64)[rows]
        return (self.codes.astype(np.float64) - zp) * self.scales[rows]

    def pack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B uint8 [N, n_blocks, blob_size], scales [N, n_blocks] in scale_dtype, zero_points or None)."""
        B = pack_codes(self.codes, self.bits, self.block_size)
        scales = np.ascontiguousarray(self.scales.T).astype(self.scale_dtype)
        zp = None if self.zero_points is None else pack_zero_points(self.zero_points, self.bits)
        return B, scales, zp


# ----------------------------------------------------------------------------------------------
# packing


def concat_columns(parts: list[BlockQuant]) -> BlockQuant:
    """One BlockQuant of column chunks quantized alike (side by side along N)."""
    if len(parts) == 1:
        return parts[0]
    zps = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts], axis=1)
    return dataclasses.replace(parts[0], codes=np.concatenate([p.codes for p in parts], axis=1),
                               scales=np.concatenate([p.scales for p in parts], axis=1), zero_points=zps)


def _pack_along_last(codes: np.ndarray, bits: int, pad_value: int = 0) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis into bytes, lower index in the low bits."""
    per = 8 // bits
    codes = np.asarray(codes, np.uint8)
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (pad,), pad_value, np.uint8)], axis=-1)
    if per == 1:
        return codes.copy()
    grouped = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per)).astype(np.uint16)
    out = np.zeros(grouped.shape[:-1], np.uint16)
    for j in range(per):
        out |= grouped[..., j] << (bits * j)
    return out.astype(np.uint8)


def _unpack_along_last(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    packed = np.asarray(packed, np.uint8)
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    out = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
    return out[..., :count]


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Codes ``[K, N]`` -> MatMulNBits' B, uint8 ``[N, n_blocks, blob_size]`` (K padded with code 0)."""
    K, N = codes.shape
    nb = n_blocks(K, block_size)
    padded = np.zeros((nb * block_size, N), np.uint8)
    padded[:K] = codes
    per_col = padded.T.reshape(N, nb, block_size)
    return np.ascontiguousarray(_pack_along_last(per_col, bits))


def unpack_codes(B: np.ndarray, bits: int, K: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[N, n_blocks, blob]`` -> codes ``[K, N]``."""
    N, nb, blob = B.shape
    codes = _unpack_along_last(B, bits, blob * 8 // bits).reshape(N, -1)
    return transpose_copy(codes[:, :K])


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``[n_blocks, N]`` -> uint8 ``[N, ceil(n_blocks * bits / 8)]`` (blocks packed per column;
    a padding slot holds ``2^(bits-1)``, as onnxruntime writes it)."""
    return np.ascontiguousarray(_pack_along_last(np.asarray(zero_points, np.uint8).T, bits, 1 << (bits - 1)))


def unpack_zero_points(zp: np.ndarray, bits: int, n_blocks_: int) -> np.ndarray:
    N = zp.shape[0]
    return np.ascontiguousarray(_unpack_along_last(zp.reshape(N, -1), bits, n_blocks_).T)


def dequantize_packed(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, bits: int,
                      block_size: int) -> np.ndarray:
    """What MatMulNBits computes with: the float64 ``[K, N]`` weight its inputs stand for."""
    N = B.shape[0]
    nb = n_blocks(K, block_size)
    codes = unpack_codes(B, bits, K).astype(np.float64)
    s = np.asarray(scales, np.float64).reshape(N, nb).T
    zp = (np.full((nb, N), 1 << (bits - 1)) if zero_points is None
          else unpack_zero_points(zero_points, bits, nb)).astype(np.float64)
    rows = np.arange(K) // block_size
    return (codes - zp[rows]) * s[rows]


# ----------------------------------------------------------------------------------------------
# scales and rounding


def _to_storage(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x, np.float64).astype(dtype).astype(np.float64)


def _signed_extreme(W: np.ndarray) -> np.ndarray:
    """Per column, the element of largest magnitude, with its sign (first one on ties)."""
    idx = np.argmax(np.abs(W), axis=0)
    return W[idx, np.arange(W.shape[1])]


def _quantize(W: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes (float64) for rows ``W`` with per-column ``scale`` and ``zp``.

    Computed like onnxruntime's quantizer, in float32: ``floor(w * (1 / scale) + zp + 0.5)``
    (half away from zero), clipped to the code range; a zero scale gives the zero point.
    """
    s32 = np.asarray(scale, np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s32 == 0, np.float32(0), np.float32(1) / s32).astype(np.float32)
    x = (np.asarray(W, np.float32) * inv).astype(np.float32) + np.asarray(zp, np.float32)
    return np.clip(np.floor(x.astype(np.float64) + 0.5), 0, (1 << bits) - 1)


def block_scales(W: np.ndarray, bits: int, symmetric: bool = True, clip_search: bool = False,
                 scale_dtype=np.float32, row_weights: np.ndarray | None = None, grid: int = 20,
                 min_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(scale [N], zero point [N] as float64 codes) of one block of rows ``W [rows, N]``.

    ``clip_search`` shrinks the range by a ratio in ``linspace(min_ratio, 1, grid)`` per column,
    keeping the one with the smallest (``row_weights``-weighted) squared rounding error of the block;
    ratio 1 (no clipping) is always a candidate, so it never does worse on that error.
    """
    W = np.asarray(W, np.float64)
    half = 1 << (bits - 1)
    levels = (1 << bits) - 1

    def scales_for(ratio: float):
        if symmetric:
            s = _to_storage(_signed_extreme(W) * ratio / -half, scale_dtype)
            return s, np.full(W.shape[1], float(half))
        # float32 arithmetic, as onnxruntime's quantizer does it
        lo = (np.minimum(W.min(axis=0), 0.0) * ratio).astype(np.float32)
        hi = (np.maximum(W.max(axis=0), 0.0) * ratio).astype(np.float32)
        s = _to_storage((hi - lo) / np.float32(levels), scale_dtype)
        s32 = s.astype(np.float32)
        safe = np.where(s32 == 0, np.float32(1), s32)
        zp = np.where(s32 == 0, 0.0, np.clip(np.floor((-lo / safe).astype(np.float64) + 0.5), 0, levels))
        return s, zp

    scale, zp = scales_for(1.0)
    if not clip_search:
        return scale, zp
    w = np.ones(W.shape[0]) if row_weights is None else np.asarray(row_weights, np.float64)

    def error(s, z):
        return w @ ((_quantize(W, s, z, bits) - z) * s - W) ** 2

    best = error(scale, zp)
    for r in np.linspace(min_ratio, 1.0, grid):
        if r >= 1.0:
            continue
        s, z = scales_for(float(r))
        err = error(s, z)
        better = err < best
        if np.any(better):
            best = np.where(better, err, best)
            scale = np.where(better, s, scale)
            zp = np.where(better, z, zp)
    return scale, zp


def quantize_blockwise(B: np.ndarray, bits: int = 4, block_size: int = 32, *, symmetric: bool = True,
                       clip_search: bool = False, scale_dtype=np.float32) -> BlockQuant:
    """Round-to-nearest block-wise quantization of ``B [K, N]``."""
    check(bits, block_size)
    B = np.asarray(B, np.float64)
    K, N = B.shape
    nb = n_blocks(K, block_size)
    codes = np.zeros((K, N), np.uint8)
    scales = np.zeros((nb, N))
    zps = np.zeros((nb, N))
    for b in range(nb):
        rows = slice(b * block_size, min(K, (b + 1) * block_size))
        s, z = block_scales(B[rows], bits, symmetric, clip_search, scale_dtype)
        scales[b], zps[b] = s, z
        codes[rows] = _quantize(B[rows], s, z, bits).astype(np.uint8)
    return BlockQuant(codes, scales, None if symmetric else zps.astype(np.uint8), bits, block_size, scale_dtype)


class _BlockwiseRounder:
    """The row quantizer :func:`onnxqf.maths.gptq.gptq_round` calls, with per-(block, column) scales."""

    def __init__(self, B, bits, block_size, symmetric, clip_search, scale_dtype, static, row_weights):
        K, N = B.shape
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.clip_search, self.scale_dtype, self.row_weights = clip_search, scale_dtype, row_weights
        nb = n_blocks(K, block_size)
        self.codes = np.zeros((K, N), np.uint8)
        self.scales = np.zeros((nb, N))
        self.zps = np.zeros((nb, N))
        self.ready = np.zeros(nb, bool)
        if static:
            for b in range(nb):
                self._set_block(b, B[b * block_size : min(K, (b + 1) * block_size)], b * block_size)

    def _set_block(self, b, W, first_row):
        rw = None if self.row_weights is None else self.row_weights[first_row : first_row + W.shape[0]]
        self.scales[b], self.zps[b] = block_scales(W, self.bits, self.symmetric, self.clip_search, self.scale_dtype, rw)
        self.ready[b] = True

    def __call__(self, row: int, w: np.ndarray, ahead: np.ndarray) -> np.ndarray:
        b = row // self.block_size
        if not self.ready[b]:
            # the first row of the block in K order: ahead holds this row and the rest of the block, updated
            assert row % self.block_size == 0, "dynamic block scales need rows in K order"
            self._set_block(b, ahead[: self.block_size], row)
        s, z = self.scales[b], self.zps[b]
        c = _quantize(w[None, :], s, z, self.bits)[0]
        self.codes[row] = c.astype(np.uint8)
        return (c - z) * s


def refit_scales(q: BlockQuant, B: np.ndarray, H: np.ndarray, ridge: float = 1e-6) -> BlockQuant:
    """The same codes with the scales that minimize ``||X (B - Q)||^2 = tr(E^T H E)`` (``E = B - Q``).

    For fixed codes the weight is linear in the scales, so for each column n the best scales of its
    blocks solve ``G_n s_n = r_n`` with ``G_n[a, b] = a_a^T H_ab a_b`` and ``r_n[a] = a_a^T (H b_n)_a``
    (``a = codes - zero point`` restricted to block a). Scales are then rounded to their storage type.
    """
    B = np.asarray(B, np.float64)
    H = np.asarray(H, np.float64)
    K, N = B.shape
    g, nb = q.block_size, q.scales.shape[0]
    rows = np.arange(K) // g
    A = q.codes.astype(np.float64) - q.zero_point_array().astype(np.float64)[rows]  # [K, N]
    seg = np.zeros((nb, K))
    seg[rows, np.arange(K)] = 1.0  # block membership, for segment sums over rows
    G = np.empty((N, nb, nb))
    for b in range(nb):
        r = slice(b * g, min(K, (b + 1) * g))
        HAb = H[:, r] @ A[r]  # [K, N]: H restricted to block b's columns times its codes
        G[:, :, b] = (seg @ (A * HAb)).T
    R = (seg @ (A * (H @ B))).T  # [N, nb]
    diag = np.einsum("nbb->nb", G)
    G[:, np.arange(nb), np.arange(nb)] += ridge * np.maximum(diag.mean(axis=1, keepdims=True), 1e-30) + (diag == 0)
    s_new = np.linalg.solve(G, R[..., None])[..., 0].T  # [nb, N]
    s_new = np.where(diag.T == 0, q.scales, s_new)  # blocks without signal keep their scale
    return dataclasses.replace(q, scales=_to_storage(s_new, q.scale_dtype))


def gptq_blockwise(B: np.ndarray, H: np.ndarray | PreparedHessian, bits: int = 4, block_size: int = 32, *,
                   symmetric: bool = True, clip_search: bool = False, act_order: bool = False, damp: float = 0.01,
                   refine: int = 0, scale_dtype=np.float32) -> BlockQuant:
    """GPTQ rounding of ``B [K, N]`` given ``H = X^T X [K, K]``, stored block-wise (see module doc).

    With ``clip_search`` each block's scale minimizes the rounding error of the block weighted by
    ``diag(H)`` (the error each input channel contributes to the output on its own). ``refine``
    rounds of: refit the scales to the codes (:func:`refit_scales`), then GPTQ again with those
    scales fixed; a round is kept only if it lowers ``tr(E^T H E)``.
    """
    check(bits, block_size)
    B = np.asarray(B, np.float64)
    lazy = max(32, block_size)  # lazy-update blocks hold whole quantization blocks (smaller is faster in numpy)
    prepared = isinstance(H, PreparedHessian)
    if prepared and refine:
        raise ValueError("refine needs H itself, not a PreparedHessian")
    diag = H.diag if prepared else np.diag(np.asarray(H, np.float64))
    rw = np.maximum(diag, 0.0) if clip_search else None
    rounder = _BlockwiseRounder(B, bits, block_size, symmetric, clip_search, scale_dtype, static=act_order,
                                row_weights=rw)
    gptq_round(B, H, rounder, damp=damp, block=lazy, act_order=act_order)
    q = BlockQuant(rounder.codes, rounder.scales, None if symmetric else rounder.zps.astype(np.uint8), bits,
                   block_size, scale_dtype)
    if refine:
        best, best_err = q, output_error(q, B, H)
        for _ in range(refine):
            fitted = refit_scales(best, B, H)
            rounder = _BlockwiseRounder(B, bits, block_size, symmetric, False, scale_dtype, static=False,
                                        row_weights=None)
            rounder.scales[:], rounder.zps[:] = fitted.scales, fitted.zero_point_array()
            rounder.ready[:] = True
            gptq_round(B, H, rounder, damp=damp, block=lazy, act_order=act_order)
            again = dataclasses.replace(fitted, codes=rounder.codes)
            for cand in (fitted, again):
                err = output_error(cand, B, H)
                if err < best_err:
                    best, best_err = cand, err
        q = best
    return q


def output_error(q: BlockQuant, B: np.ndarray, H: np.ndarray) -> float:
    """``tr(E^T H E)`` with ``E = B - dequant(q)``: the layer's squared output error on the calibration inputs."""
    E = np.asarray(B, np.float64) - q.dequantize()
    return float(np.sum(E * (np.asarray(H, np.float64) @ E)))
