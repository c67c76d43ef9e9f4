"""Smoothing scales (SmoothQuant) and the measured choice of alpha, on numpy arrays.

A site is one activation read by one or more linears: ``x @ [B_1 | ... | B_k]``. Smoothing divides
activation channel j by ``s_j`` and multiplies weight row j by ``s_j``. With ``alpha="auto"`` each
site gets the alpha from a grid that minimises the layer-wise quantization error
``||X B - Q(X') Q(B')||_F^2`` on sampled calibration tokens, where ``(X', B')`` are the smoothed
and then rotated activation and weight (:func:`onnxqf.maths.fold.smooth_rotate`, with the rotation the
plan will apply): the same per-token int8 activations and per-channel int8 weights that the
rewritten graph uses. ``alpha = 0`` (s = 1/max|B_j|, weights equalised) and no smoothing (s = 1)
are always candidates, so auto never does worse than no smoothing on the sample. The search is
fast enough for 7B layers (``scripts/alpha_search_bench.py``): rotations applied as Kronecker
factors, float32 arithmetic, at most :data:`MAX_SCORED_WEIGHTS` weight entries scored per candidate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxqf.maths import fold, qmath
from onnxqf.maths.metrics import layer_error

__all__ = ["ALPHA_GRID", "site_scales", "expand_groups", "kv_scales", "relative_error", "Choice",
           "MAX_SCORED_WEIGHTS", "MIN_SCORED_COLUMNS", "scored_columns", "choose_scales"]

ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def site_scales(act_absmax: np.ndarray, B: np.ndarray | None, alpha: float, groups: tuple[int, int, int] | None = None,
                *, weight_absmax: np.ndarray | None = None) -> np.ndarray:
    """Scales for one site; ``groups=(n_kv, g, head_dim)`` ties channels that share a KV head.

    o_proj's input channel (h, d) comes from value channel (h // g, d), so its scale can fold
    into v_proj only if all g heads of a group share it: statistics are maxed over the group.
    ``weight_absmax`` (max |B_j| per input row) may be given instead of ``B``.
    """
    w = qmath.weight_row_absmax(B) if weight_absmax is None else weight_absmax
    a = np.asarray(act_absmax, np.float64)
    if groups is None:
        return qmath.smooth_scales(a, w, alpha)
    n_kv, g, dh = groups
    a_kv = a.reshape(n_kv, g, dh).max(axis=1).reshape(-1)
    w_kv = w.reshape(n_kv, g, dh).max(axis=1).reshape(-1)
    s_kv = qmath.smooth_scales(a_kv, w_kv, alpha)
    return expand_groups(s_kv, groups)


def expand_groups(s_kv: np.ndarray, groups: tuple[int, int, int]) -> np.ndarray:
    n_kv, g, dh = groups
    return np.repeat(s_kv.reshape(n_kv, 1, dh), g, axis=1).reshape(-1)


def kv_scales(s: np.ndarray, groups: tuple[int, int, int]) -> np.ndarray:
    """The per-value-channel scales behind expanded o_proj scales."""
    n_kv, g, dh = groups
    return s.reshape(n_kv, g, dh)[:, 0, :].reshape(-1)


def relative_error(X: np.ndarray, B: np.ndarray, s: np.ndarray | None = None, R: np.ndarray | None = None,
                   Y: np.ndarray | None = None) -> float:
    """``||X B - Q(X') Q(B')||^2 / ||X B||^2`` for ``(X', B') = smooth_rotate(X, B, s, R)`` (W8A8)."""
    Xt, Bt = fold.smooth_rotate(X, B, s, R)
    err, ref = layer_error(Xt, Bt, 8, Y=np.asarray(X, np.float64) @ B if Y is None else Y)
    return err / ref if ref > 0 else 0.0


@dataclasses.dataclass
class Choice:
    scales: np.ndarray
    alpha: float | None  # None: no smoothing won
    predicted: float  # relative W8A8 layer error of the choice, after the rotation
    unsmoothed: float  # the same without smoothing


#: the α search scores at most this many weight entries per candidate (input channels x output
#: columns): a site with more output columns is scored on an evenly spread subset of them (SmolLM2's
#: largest site, 576 x 3072, is scored whole; Llama-2-7B's 4096-wide sites on 1024 columns)
MAX_SCORED_WEIGHTS = 1 << 22
MIN_SCORED_COLUMNS = 256


def scored_columns(n_in: int, n_out: int) -> np.ndarray | None:
    """The output columns the α search scores for a site of ``n_in`` channels read by ``n_out`` columns in
    all (None: all of them)."""
    cols = max(MIN_SCORED_COLUMNS, MAX_SCORED_WEIGHTS // max(1, n_in))
    return np.linspace(0, n_out - 1, cols).round().astype(np.int64) if n_out > cols else None


class _Scorer:
    """The relative W8A8 layer error of candidate scales on one site's sample, fast.

    Per candidate: ``X' = (X / s) R`` and ``B' = R^T diag(s) B`` with R applied as Kronecker factors,
    per-token and per-channel fake quantization, and the product ``Q(X') Q(B')``, all in float32
    (relative rounding ~1e-7, far below the quantization errors being compared). The reference
    ``Y = X B`` is computed once. The error is a sum over output columns, each quantized on its own,
    so a site with more than ``MAX_SCORED_WEIGHTS / in`` columns is scored on an evenly spaced subset
    of them, the same for every candidate (an estimate of the whole site's error).
    """

    def __init__(self, X: np.ndarray, B: np.ndarray, R, *, scored: bool = False):
        cols = None if scored else scored_columns(*B.shape)  # scored: B holds only those columns already
        if cols is not None:
            B = B[:, cols]
        self.X, self.B, self.R = X.astype(np.float32), np.ascontiguousarray(B, np.float32), R
        if isinstance(R, fold.KronRotation):
            self.R = R.astype(np.float32)
        elif R is not None:
            self.R = np.asarray(R, np.float32)
        self.Y = self.X @ self.B
        self.ref = float(np.einsum("ij,ij->", self.Y, self.Y, dtype=np.float64))

    def __call__(self, s: np.ndarray | None) -> float:
        X, B = self.X, self.B
        if s is not None:
            s = np.asarray(s, np.float32)
            X, B = X / s, B * s[:, None]
        if isinstance(self.R, fold.KronRotation):
            X, B = self.R.apply(X), self.R.apply_input(B)
        elif self.R is not None:
            X, B = X @ self.R, self.R.T @ B
        d = self.Y - _fake_quant_rows(X) @ _fake_quant_rows(B.T).T
        err = float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        return err / self.ref if self.ref > 0 else 0.0


def _fake_quant_rows(A: np.ndarray) -> np.ndarray:
    """Symmetric int8 quantize-dequantize of each row (float32): per token for X, per output channel for B^T.

    ``|A / scale| <= 127`` by construction of the scale, so no clipping is needed."""
    scale = np.abs(A).max(axis=-1, keepdims=True) / np.float32(127)
    scale[scale == 0] = 1
    q = np.divide(A, scale)
    np.rint(q, out=q)
    q *= scale
    return q


def choose_scales(X: np.ndarray, act_absmax: np.ndarray, B: np.ndarray, alpha: float | str,
                  groups: tuple[int, int, int] | None = None, R=None, *,
                  weight_absmax: np.ndarray | None = None) -> Choice:
    """The smoothing of one site: a fixed alpha, or with "auto" the candidate of lowest measured error.

    ``R``: the rotation that follows (a dense matrix or :class:`onnxqf.maths.fold.KronRotation`), or None.
    ``weight_absmax``: the row maxima of the whole weight when ``B`` holds only its
    :func:`scored_columns` (so that a large site's weight need not be in memory as a whole).
    """
    X = np.asarray(X, np.float64)
    B = np.asarray(B, np.float64)
    score = _Scorer(X, B, R, scored=weight_absmax is not None)
    w = qmath.weight_row_absmax(B) if weight_absmax is None else np.asarray(weight_absmax, np.float64)
    none = score(None)
    if alpha != "auto":
        s = site_scales(act_absmax, None, float(alpha), groups, weight_absmax=w)
        return Choice(s, float(alpha), score(s), none)
    best = Choice(np.ones(B.shape[0]), None, none, none)
    for a in ALPHA_GRID:
        s = site_scales(act_absmax, None, a, groups, weight_absmax=w)
        err = score(s)
        if err < best.predicted:
            best = Choice(s, a, err, none)
    return best
