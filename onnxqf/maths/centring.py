"""Centring the residual stream: a LayerNorm becomes an RMSNorm (pure numpy).

``LayerNorm(x) = (x − μ(x)) / sqrt(var(x) + ε)`` with ``μ(x) = mean(x)`` and ``var(x) = mean((x − μ)²)``, so
``LayerNorm(x) = RMSNorm(x − μ(x))`` with the same ε: a LayerNorm is an RMSNorm of the centred vector. The
centring ``x ↦ x − μ(x)`` is the linear map ``C = I − 11ᵀ/d`` (symmetric, idempotent, ``C 1 = 0``). When every
vector written into the residual stream is already zero-mean, ``C`` does nothing there, and each LayerNorm that
reads the stream equals an RMSNorm, which commutes with a rotation. The writers are made zero-mean by composing
them with ``C`` on their output side:

* the embedding table ``E [vocab, hidden]``: each row minus its mean, ``E C``;
* a linear writing the stream, ``y = x B + b`` with ``B [in, hidden]``: ``B C`` (each row of ``B`` minus its mean
  over the outputs) and ``b C`` (the bias minus its mean).

A sum of zero-mean vectors is zero-mean, so the residual Adds keep the stream centred.
"""

from __future__ import annotations

import numpy as np

__all__ = ["centre", "centring_matrix"]


def centre(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """``a`` minus its mean along ``axis`` (float64): each slice along ``axis`` becomes zero-mean. For a weight
    ``B [in, out]`` and ``axis=1`` this is ``B (I − 11ᵀ/out)``."""
    a = np.asarray(a, np.float64)
    return a - a.mean(axis=axis, keepdims=True)


def centring_matrix(d: int) -> np.ndarray:
    """``C = I − 11ᵀ/d``, the d×d projection that :func:`centre` applies along an axis (``x C = x − mean(x)``)."""
    return np.eye(d) - np.full((d, d), 1.0 / d)
