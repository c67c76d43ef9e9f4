"""Smoothing scales (SmoothQuant) and the measured choice of alpha, on numpy arrays.

A site is one activation read by one or more linears: ``x @ [B_1 | ... | B_k]``. Smoothing divides
activation channel j by ``s_j`` and multiplies weight row j by ``s_j``. With ``alpha="auto"`` each
site gets the alpha from a grid that minimises the layer-wise quantization error
``||X B - Q(X') Q(B')||_F^2`` on sampled calibration tokens, where ``(X', B')`` are the smoothed
and then rotated activation and weight (:func:`onnxqf.fold.smooth_rotate`, with the rotation the
plan will apply): the same per-token int8 activations and per-channel int8 weights that the
rewritten graph uses. ``alpha = 0`` (s = 1/max|B_j|, weights equalised) and no smoothing (s = 1)
are always candidates, so auto never does worse than no smoothing on the sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxqf import fold, qmath
from onnxqf.metrics import layer_error

ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def site_scales(act_absmax: np.ndarray, B: np.ndarray, alpha: float, groups: tuple[int, int, int] | None = None) -> np.ndarray:
    """Scales for one site; ``groups=(n_kv, g, head_dim)`` ties channels that share a KV head.

    o_proj's input channel (h, d) comes from value channel (h // g, d), so its scale can fold
    into v_proj only if all g heads of a group share it: statistics are maxed over the group.
    """
    w = qmath.weight_row_absmax(B)
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


def choose_scales(X: np.ndarray, act_absmax: np.ndarray, B: np.ndarray, alpha: float | str,
                  groups: tuple[int, int, int] | None = None, R: np.ndarray | None = None) -> Choice:
    """The smoothing of one site: a fixed alpha, or with "auto" the candidate of lowest measured error."""
    X = np.asarray(X, np.float64)
    B = np.asarray(B, np.float64)
    Y = X @ B
    none = relative_error(X, B, None, R, Y)
    if alpha != "auto":
        s = site_scales(act_absmax, B, float(alpha), groups)
        return Choice(s, float(alpha), relative_error(X, B, s, R, Y), none)
    best = Choice(np.ones(B.shape[0]), None, none, none)
    for a in ALPHA_GRID:
        s = site_scales(act_absmax, B, a, groups)
        err = relative_error(X, B, s, R, Y)
        if err < best.predicted:
            best = Choice(s, a, err, none)
    return best
