"""Quantization-friendliness metrics (pure numpy, float64 internally).

* Channel magnitudes and the "quantization difficulty" (std of channel magnitudes).
* Streaming per-channel activation statistics (:class:`ChannelStats`).
* Layer output error of fake quantization (:func:`layer_error`).
* End-to-end logit comparisons: KL, perplexity, top-1 agreement
  (:func:`kl_divergence`, :func:`perplexity_nll`, :func:`top1_agreement`,
  :class:`LogitComparison`).

Activations are ``[tokens, channels]`` (leading dims are flattened into tokens);
weights are ONNX MatMul ``[in, out]``; logits are ``[..., vocab]``.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from . import qmath

__all__ = [
    "channel_magnitudes",
    "weight_channel_magnitudes",
    "difficulty",
    "ChannelStats",
    "layer_error",
    "log_softmax",
    "kl_divergence",
    "perplexity_nll",
    "top1_agreement",
    "LogitComparison",
]

_ROW_CHUNK = 4096  # rows per float64 chunk for activation statistics
_LOGIT_CHUNK = 32  # rows per float64 chunk for [*, vocab] logits (32 x 49152 x 8 B = 12.6 MB)


def _as_rows(X: np.ndarray) -> np.ndarray:
    """View ``[..., C]`` as ``[N, C]`` without copying or changing dtype."""
    X = np.asarray(X)
    if X.ndim == 0:
        raise ValueError("expected an array with a channel axis")
    if X.ndim == 1:
        return X.reshape(1, -1)
    return X.reshape(-1, X.shape[-1])


def _row_chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


# --------------------------------------------------------------------------- magnitudes


def channel_magnitudes(X: np.ndarray) -> np.ndarray:
    """L2 norm of every channel (column) of activations: ``c_j = ||X[:, j]||_2`` (float64 ``[C]``)."""
    stats = ChannelStats()
    stats.update(X)
    return stats.l2


def weight_channel_magnitudes(B: np.ndarray) -> np.ndarray:
    """L2 norm of every input row of a ``[in, out]`` weight: ``||B[j, :]||_2`` (float64 ``[in]``)."""
    B = np.asarray(B, dtype=np.float64)
    if B.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {B.shape}")
    return np.sqrt(np.sum(B * B, axis=1))


def difficulty(c: np.ndarray) -> float:
    """Quantization difficulty: population std (ddof=0) of channel magnitudes ``c``."""
    c = np.asarray(c, dtype=np.float64).ravel()
    if c.size == 0:
        return float("nan")
    return float(np.std(c))


class ChannelStats:
    """Streaming per-channel activation statistics; memory is ``O(channels)``.

    ``update(X)`` accepts ``[tokens, C]`` (or ``[..., C]``) chunks of any float dtype and
    accumulates, in float64: per-channel sum of squares, per-channel ``max|x|``, the token
    count and the global ``max|x|``.
    """

    def __init__(self, channels: int | None = None) -> None:
        self._sumsq: np.ndarray | None = None
        self._absmax: np.ndarray | None = None
        self._count = 0
        if channels is not None:
            self._init(int(channels))

    def _init(self, channels: int) -> None:
        self._sumsq = np.zeros(channels, dtype=np.float64)
        self._absmax = np.zeros(channels, dtype=np.float64)

    def _check(self, channels: int) -> None:
        if self._sumsq is None:
            self._init(channels)
        elif self._sumsq.shape[0] != channels:
            raise ValueError(f"channel count changed: {self._sumsq.shape[0]} -> {channels}")

    def update(self, X: np.ndarray) -> "ChannelStats":
        """Accumulate a chunk of activations; returns ``self``."""
        rows = _as_rows(X)
        self._check(rows.shape[1])
        for sl in _row_chunks(rows.shape[0], _ROW_CHUNK):
            a = np.abs(rows[sl].astype(np.float64, copy=False))
            self._sumsq += np.einsum("ij,ij->j", a, a)
            np.maximum(self._absmax, a.max(axis=0), out=self._absmax)
        self._count += rows.shape[0]
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another accumulator's statistics into this one; returns ``self``."""
        if other._sumsq is None:
            return self
        self._check(other._sumsq.shape[0])
        self._sumsq += other._sumsq
        np.maximum(self._absmax, other._absmax, out=self._absmax)
        self._count += other._count
        return self

    def _need(self) -> None:
        if self._sumsq is None:
            raise ValueError("ChannelStats has no data yet")

    @property
    def channels(self) -> int:
        """Number of channels (0 before the first update)."""
        return 0 if self._sumsq is None else int(self._sumsq.shape[0])

    @property
    def sumsq(self) -> np.ndarray:
        """Per-channel sum of squares (float64 ``[C]``)."""
        self._need()
        return self._sumsq.copy()

    @property
    def l2(self) -> np.ndarray:
        """Per-channel L2 norm ``sqrt(sum x^2)``: the channel magnitude."""
        self._need()
        return np.sqrt(self._sumsq)

    @property
    def rms(self) -> np.ndarray:
        """Per-channel root mean square ``sqrt(sum x^2 / count)``."""
        self._need()
        return np.sqrt(self._sumsq / max(self._count, 1))

    @property
    def absmax(self) -> np.ndarray:
        """Per-channel ``max|x|`` (float64 ``[C]``)."""
        self._need()
        return self._absmax.copy()

    @property
    def count(self) -> int:
        """Number of tokens (rows) seen."""
        return self._count

    @property
    def max(self) -> float:
        """Global ``max|x|`` over all tokens and channels (0.0 before any data)."""
        if self._absmax is None or self._absmax.size == 0:
            return 0.0
        return float(self._absmax.max())


# --------------------------------------------------------------------------- layer error


def layer_error(Xt: np.ndarray, Bt: np.ndarray, bits: int = 8, *, Y: np.ndarray | None = None,
                Bq: np.ndarray | None = None, clip_search: bool = False) -> tuple[float, float]:
    """``(||Y - Q(X') Q(B')||_F^2, ||Y||_F^2)``: the layer-wise quantization error (DESIGN.md §4).

    ``Q(X')`` is symmetric per-token and ``Q(B')`` symmetric per-output-channel fake quantization
    with ``bits``. ``Y`` defaults to ``X' B'`` (pass the untransformed ``X B`` once for several
    transforms: they all compute the same product), ``Bq`` to ``Q(B')``.
    """
    Xt = _as_rows(Xt).astype(np.float64, copy=False)
    Y = Xt @ Bt if Y is None else Y
    if Bq is None:
        Bq = qmath.fake_quant_weight(np.asarray(Bt, np.float64), bits=bits, clip_search=clip_search)
    d = Y - qmath.fake_quant_per_token(Xt, bits) @ Bq
    return float(np.einsum("ij,ij->", d, d)), float(np.einsum("ij,ij->", Y, Y))


# --------------------------------------------------------------------------- logits


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable float64 log-softmax along ``axis``."""
    z = np.asarray(logits, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = z - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _kl_rows(lo: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """Per-row KL(P||Q) from log-probabilities (zero-probability terms contribute 0)."""
    p = np.exp(lo)
    with np.errstate(invalid="ignore"):
        t = np.where(p > 0, p * (lo - ln), 0.0)
    return t.sum(axis=-1)


def _align_targets(targets: np.ndarray | None, lead: tuple[int, ...]) -> np.ndarray | None:
    """Targets as int64 ``[N]`` matching flattened logits rows; negative = no target.

    ``targets`` may have the logits' leading shape, or be shorter along the last position axis
    (e.g. ``T-1`` next-token ids for ``T`` positions), in which case it is padded with -1.
    """
    if targets is None:
        return None
    t = np.asarray(targets).astype(np.int64, copy=False)
    if t.shape != lead:
        if t.ndim == len(lead) and t.ndim >= 1 and t.shape[:-1] == lead[:-1] and t.shape[-1] <= lead[-1]:
            pad = [(0, 0)] * (t.ndim - 1) + [(0, lead[-1] - t.shape[-1])]
            t = np.pad(t, pad, constant_values=-1)
        else:
            raise ValueError(f"targets shape {t.shape} does not match logits positions {lead}")
    return t.reshape(-1)


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean over positions of ``KL(softmax(p) || softmax(q))`` in nats (inputs ``[..., vocab]``)."""
    acc = LogitComparison()
    acc.update(logits_p, logits_q)
    return acc.result()["kl"]


def perplexity_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and number of scored positions.

    ``targets`` holds the token id to score at each logits position (negative ids, or missing
    trailing positions, are skipped). Perplexity is ``exp(nll / count)``.
    """
    rows = _as_rows(logits)
    t = _align_targets(targets, np.asarray(logits).shape[:-1])
    nll, n = 0.0, 0
    for sl in _row_chunks(rows.shape[0], _LOGIT_CHUNK):
        nll_c, n_c = _nll_chunk(log_softmax(rows[sl]), t[sl])
        nll += nll_c
        n += n_c
    return nll, n


def _nll_chunk(logp: np.ndarray, t: np.ndarray) -> tuple[float, int]:
    mask = t >= 0
    if not np.any(mask):
        return 0.0, 0
    idx = np.nonzero(mask)[0]
    if np.any(t[idx] >= logp.shape[-1]):
        raise ValueError("target id out of vocabulary range")
    return float(-np.sum(logp[idx, t[idx]])), int(idx.size)


def top1_agreement(lp: np.ndarray, lq: np.ndarray) -> float:
    """Fraction of positions where ``argmax`` of both logits agrees."""
    a = np.argmax(np.asarray(lp), axis=-1)
    b = np.argmax(np.asarray(lq), axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.mean(a == b)) if a.size else float("nan")


def _ppl(nll: float, n: int) -> float:
    """``exp(nll / n)``; NaN for no tokens, inf on overflow."""
    if n <= 0:
        return float("nan")
    try:
        return math.exp(nll / n)
    except OverflowError:
        return float("inf")


class LogitComparison:
    """Streaming comparison of original vs transformed-model logits.

    ``update(logits_orig, logits_new, targets)`` takes ``[..., vocab]`` arrays (float32 is fine;
    rows are converted to float64 in small chunks so memory stays ``O(chunk * vocab)``).
    ``targets`` are next-token ids aligned with logits positions; negative ids (or missing trailing
    positions) are excluded from perplexity but still count for KL and top-1.
    """

    def __init__(self, chunk_rows: int = _LOGIT_CHUNK) -> None:
        self.chunk_rows = max(1, int(chunk_rows))
        self.kl_sum = 0.0
        self.top1_hits = 0
        self.tokens = 0
        self.nll_orig = 0.0
        self.nll_new = 0.0
        self.target_tokens = 0

    def update(
        self,
        logits_orig: np.ndarray,
        logits_new: np.ndarray,
        targets: np.ndarray | None = None,
    ) -> "LogitComparison":
        """Accumulate one window of logits; returns ``self``."""
        lo_all = np.asarray(logits_orig)
        ln_all = np.asarray(logits_new)
        if lo_all.shape != ln_all.shape:
            raise ValueError(f"logits shape mismatch: {lo_all.shape} vs {ln_all.shape}")
        t = _align_targets(targets, lo_all.shape[:-1])
        ro, rn = _as_rows(lo_all), _as_rows(ln_all)
        for sl in _row_chunks(ro.shape[0], self.chunk_rows):
            lo = log_softmax(ro[sl])
            ln = log_softmax(rn[sl])
            self.kl_sum += float(np.sum(_kl_rows(lo, ln)))
            self.top1_hits += int(np.sum(np.argmax(ro[sl], axis=-1) == np.argmax(rn[sl], axis=-1)))
            self.tokens += lo.shape[0]
            if t is not None:
                a, n = _nll_chunk(lo, t[sl])
                b, _ = _nll_chunk(ln, t[sl])
                self.nll_orig += a
                self.nll_new += b
                self.target_tokens += n
        return self

    def merge(self, other: "LogitComparison") -> "LogitComparison":
        """Add another accumulator's sums into this one; returns ``self``."""
        self.kl_sum += other.kl_sum
        self.top1_hits += other.top1_hits
        self.tokens += other.tokens
        self.nll_orig += other.nll_orig
        self.nll_new += other.nll_new
        self.target_tokens += other.target_tokens
        return self

    def result(self) -> dict:
        """``{kl, ppl_orig, ppl_new, top1, tokens, ppl_tokens}`` (NaN where undefined)."""
        nan = float("nan")
        n, m = self.tokens, self.target_tokens
        return {
            "kl": self.kl_sum / n if n else nan,
            "ppl_orig": _ppl(self.nll_orig, m),
            "ppl_new": _ppl(self.nll_new, m),
            "top1": self.top1_hits / n if n else nan,
            "tokens": n,
            "ppl_tokens": m,
        }
