"""Hadamard matrices and randomized Hadamard rotations (pure numpy).

Constructions (unnormalised, entries ±1, ``H @ H.T == n * I``):

* **Sylvester**: ``n = 2^m``, ``H_{2n} = [[H_n, H_n], [H_n, -H_n]] = H_2 ⊗ H_n``.
* **Paley I**: ``n = q + 1`` for a prime power ``q ≡ 3 (mod 4)``. With the
  quadratic character χ of GF(q) and the (antisymmetric) Jacobsthal matrix
  ``Q[a, b] = χ(a - b)``, ``S = [[0, 1ᵀ], [-1, Q]]`` and ``H = I + S``.
* **Paley II**: ``n = 2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``. Here Q is
  symmetric, ``C = [[0, 1ᵀ], [1, Q]]`` is a conference matrix and
  ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.
* **Williamson**: ``n = 4m`` from four symmetric circulant ±1 matrices A, B, C, D of order m with
  ``A² + B² + C² + D² = 4m I``: ``H = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``.
  The one quadruple held is m = 43 (order 172: Llama-2-7B's d_ff 11008 = 172 · 64, where Paley gives only
  344 · 32, a dense factor twice as costly online); its first rows are tabulated in M. Hall, *Combinatorial
  Theory* (2nd ed., 1986), and :func:`williamson` checks the identity on every build.
* **Kronecker**: ``H_{ab} = H_a ⊗ H_b``.

Prime powers use a small GF(p^k) implementation: an irreducible monic
polynomial of degree k is found by trial division, elements are the integers
``0..q-1`` (base-p digits = polynomial coefficients) and χ comes from the
explicit set of non-zero squares.

``hadamard_matrix(n)`` writes ``n = K · 2^m`` with the *largest* power of two for
which the remaining part K has a construction (Paley I/II, Williamson, or a Kronecker
product of constructible pieces) and returns ``H_K ⊗ Sylvester(2^m)``. It
returns None when nothing applies (n not 1, 2 or a multiple of 4, and e.g.
92, 156, 184). ``hadamard_factors`` returns the same matrix, normalised, as a
list of small orthonormal Kronecker factors ``[H_K/√K, S_f1/√f1, ...]`` (the
Sylvester part split into blocks of at most ``max_factor``), so that
``x @ H`` can be applied online with reshapes and small MatMuls in
``O(n · Σ f_i)`` (see :func:`onnxqf.maths.fold.kron_apply`).

Fallback policy (``rotation(..., fallback="orthogonal")``): when n has no full
construction, n is written as ``K · 2^m`` with ``K = odd(n) · min(4, 2^v2(n))``
(the smallest part whose order could admit a Hadamard matrix at all) and the
K block becomes a Haar-random orthogonal matrix, ``orthogonal(K) ⊗ Sylvester(2^m)``
(kind ``"hadamard+orthogonal(K)"``), or a fully random orthogonal n×n matrix
when ``K == n`` (kind ``"orthogonal"``). The result is still exactly
orthogonal, but the random block is dense: it costs ``O(n · K)`` online instead
of ``O(n · (K_hadamard + log n))`` and is less incoherent than a Hadamard block.
``fallback="error"`` raises :class:`NoHadamardError` instead.

The rotation is ``Q = diag(signs) · H`` (signs scale the *rows*, i.e. they are
applied to the activation before mixing: ``x @ Q = (x * signs) @ H``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from onnxqf.errors import OnnxqfError

__all__ = [
    "ONLINE_GROUP_MAX",
    "online_groups",
    "NoHadamardError",
    "Rotation",
    "hadamard_factors",
    "hadamard_matrix",
    "has_hadamard",
    "paley1",
    "paley2",
    "williamson",
    "random_orthogonal",
    "rotation",
    "sylvester", "jacobsthal", "walsh_matrix", "walsh_sign"]


class NoHadamardError(OnnxqfError, ValueError):
    """No Hadamard construction is available for the requested size."""


# ----------------------------------------------------------------------------- small helpers


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _v2(n: int) -> int:
    """Exponent of 2 in n (n > 0)."""
    return (n & -n).bit_length() - 1


def _check_size(n: int, what: str = "n") -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return n


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, k) with q == p**k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------- GF(p^k)


def _poly_mod(a: list[int], f: tuple[int, ...], p: int) -> list[int]:
    """a mod f over GF(p); polys are little-endian coefficient lists, f monic."""
    a = [c % p for c in a]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i]
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return (a + [0] * k)[:k]


def _divides(g: tuple[int, ...], f: tuple[int, ...], p: int) -> bool:
    """Whether monic g divides f over GF(p)."""
    return not any(_poly_mod(list(f), g, p))


def _monic(deg: int, p: int):
    for low in product(range(p), repeat=deg):
        yield tuple(low) + (1,)


@functools.lru_cache(maxsize=None)
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p) (little-endian)."""
    for f in _monic(k, p):
        if f[0] == 0 and k > 1:
            continue  # divisible by x
        if all(not _divides(g, f, p) for d in range(1, k // 2 + 1) for g in _monic(d, p)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


@functools.lru_cache(maxsize=None)
def jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[a, b] = χ(a - b) of GF(q), q an odd prime power (read-only)."""
    pk = _prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"q={q} is not an odd prime power")
    p, k = pk
    f = _irreducible(p, k) if k > 1 else (0, 1)
    digits = np.array([[(x // p**i) % p for i in range(k)] for x in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)

    def square(x: int) -> int:
        a = [int(c) for c in digits[x]]
        prod = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                prod[i + j] += ai * aj
        return int(np.dot(_poly_mod(prod, f, p), weights))

    chi = -np.ones(q, dtype=np.float64)
    chi[[square(x) for x in range(1, q)]] = 1.0
    chi[0] = 0.0
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # (a - b) digit-wise
    return _readonly(chi[diff @ weights])


# ----------------------------------------------------------------------------- constructions


def sylvester(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n = 2^m (±1 entries, float64)."""
    n = _check_size(n)
    if not _is_pow2(n):
        raise ValueError(f"sylvester: n={n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def walsh_matrix(n: int) -> np.ndarray:
    """``H_n / sqrt(n)``: Sylvester's Hadamard matrix of order n (a power of two), normalised (symmetric)."""
    return sylvester(n) / np.sqrt(n)


def walsh_sign(M: np.ndarray | None) -> int:
    """+1 or -1 when ``M = ±H_n / sqrt(n)`` (:func:`walsh_matrix`) to the fp16 rounding of its entries (the graph
    holds a float16 model's factors in float16), else 0 (None, or any other matrix)."""
    if M is None or M.shape[0] < 2 or M.shape[0] & (M.shape[0] - 1):
        return 0
    H = walsh_matrix(M.shape[0])
    for sign in (1, -1):
        if np.allclose(M, sign * H, rtol=0, atol=1e-3 / np.sqrt(M.shape[0])):
            return sign
    return 0


def paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order q + 1, for a prime power q ≡ 3 (mod 4)."""
    q = _check_size(q, "q")
    if q % 4 != 3 or _prime_power(q) is None:
        raise ValueError(f"paley1: q={q} is not a prime power ≡ 3 (mod 4)")
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal(q)
    return s + np.eye(q + 1)


def paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix of order 2(q + 1), for a prime power q ≡ 1 (mod 4)."""
    q = _check_size(q, "q")
    if q % 4 != 1 or _prime_power(q) is None:
        raise ValueError(f"paley2: q={q} is not a prime power ≡ 1 (mod 4)")
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = jacobsthal(q)
    off = np.array([[1.0, 1.0], [1.0, -1.0]])
    diag = np.array([[1.0, -1.0], [-1.0, -1.0]])
    return np.kron(c, off) + np.kron(np.eye(q + 1), diag)


#: Williamson quadruples held, by m: for each of A, B, C, D (symmetric circulants, first entry +1) the offsets
#: j in 1 .. (m - 1) / 2 whose entry is -1 (entry m - j equals entry j).
_WILLIAMSON_MINUS = {
    43: ((2, 3, 4, 9, 11, 12, 14, 15, 18, 19, 20, 21),
         (3, 5, 8, 9, 11, 13, 18, 20, 21),
         (2, 9, 10, 11, 12, 14, 16, 17, 20),
         (1, 2, 3, 6, 7, 12, 14, 18, 21)),
}


def williamson(m: int) -> np.ndarray:
    """Williamson Hadamard matrix of order 4m from a held quadruple (module docstring); m = 43 only."""
    m = _check_size(m, "m")
    if m not in _WILLIAMSON_MINUS:
        raise ValueError(f"williamson: no quadruple of order m={m} is held (only {sorted(_WILLIAMSON_MINUS)})")
    blocks = []
    for minus in _WILLIAMSON_MINUS[m]:
        row = np.ones(m)
        row[list(minus)] = -1.0
        row[[m - j for j in minus]] = -1.0
        blocks.append(np.stack([np.roll(row, i) for i in range(m)]))  # circulant: row i is the first shifted by i
    A, B, C, D = blocks
    h = np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])
    if not np.array_equal(h @ h.T, 4 * m * np.eye(4 * m)):
        raise AssertionError(f"williamson: the quadruple of order {m} is not one")  # pragma: no cover
    return h


def _paley_recipe(n: int) -> tuple | None:
    q = n - 1
    if q % 4 == 3 and _prime_power(q):
        return ("paley1", q)
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _prime_power(q):
            return ("paley2", q)
    return None


@functools.lru_cache(maxsize=None)
def _block_recipe(k: int) -> tuple | None:
    """How to build a Hadamard block of order k without splitting off Sylvester first."""
    r = _paley_recipe(k)
    if r is not None:
        return r
    if k % 4 == 0 and k // 4 in _WILLIAMSON_MINUS:
        return ("williamson", k // 4)
    for a in range(2, math.isqrt(k) + 1):
        if k % a == 0 and _recipe(a) is not None and _recipe(k // a) is not None:
            return ("kron", a, k // a)
    return None


@functools.lru_cache(maxsize=None)
def _split(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K·2^m, K the smallest constructible part (K = 1 for powers of two)."""
    if _is_pow2(n):
        return (1, n)
    if n % 4:
        return None
    for m in range(_v2(n), -1, -1):
        k = n >> m
        if _block_recipe(k) is not None:
            return (k, 1 << m)
    return None


def _recipe(n: int) -> tuple | None:
    s = _split(n)
    if s is None:
        return None
    k, p2 = s
    return ("sylvester", n) if k == 1 else ("blockxpow2", k, p2)


@functools.lru_cache(maxsize=64)
def _build(n: int) -> np.ndarray:
    r = _recipe(n)
    assert r is not None
    if r[0] == "sylvester":
        return _readonly(sylvester(n))
    _, k, p2 = r
    return _readonly(np.kron(_build_block(k), sylvester(p2)) if p2 > 1 else _build_block(k).copy())


@functools.lru_cache(maxsize=64)
def _build_block(k: int) -> np.ndarray:
    r = _block_recipe(k)
    assert r is not None
    if r[0] == "paley1":
        h = paley1(r[1])
    elif r[0] == "paley2":
        h = paley2(r[1])
    elif r[0] == "williamson":
        h = williamson(r[1])
    else:
        h = np.kron(_build(r[1]), _build(r[2]))
    return _readonly(h)


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` has a construction for order n."""
    return _split(_check_size(n)) is not None


def hadamard_matrix(n: int) -> np.ndarray | None:
    """Unnormalised ±1 Hadamard matrix of order n (``H Hᵀ = n I``), or None if no construction applies.

    Built as ``H_K ⊗ Sylvester(2^m)`` with the largest power of two whose cofactor K is
    constructible (Paley I/II, Williamson or a Kronecker product). Cached; returns a fresh copy.
    """
    n = _check_size(n)
    if _split(n) is None:
        return None
    return _build(n).copy()


def _pow2_sizes(p2: int, max_factor: int) -> list[int]:
    sizes = []
    while p2 > 1:
        f = min(p2, max_factor)
        sizes.append(f)
        p2 //= f
    return sizes


def _check_max_factor(max_factor: int) -> int:
    max_factor = _check_size(max_factor, "max_factor")
    if max_factor < 2 or not _is_pow2(max_factor):
        raise ValueError(f"max_factor must be a power of two >= 2, got {max_factor}")
    return max_factor


def hadamard_factors(n: int, max_factor: int = 16, block: int | None = None) -> list[np.ndarray] | None:
    """Orthonormal factors ``[H_K/√K, S_f1/√f1, ...]`` whose Kronecker product is ``hadamard_matrix(n)/√n``.

    The Sylvester part is split into blocks of size ≤ max_factor (a power of two); the
    non-power-of-two part K is a single factor. Returns None when no construction exists.
    ``block``: K itself instead of the smallest constructible part (n / K a power of two; a benchmark's
    way to compare factor splits, e.g. 11008 = 344 (Paley I) · 32 against 172 (Williamson) · 64).
    """
    n = _check_size(n)
    max_factor = _check_max_factor(max_factor)
    if block is not None:
        block = _check_size(block, "block")
        if n % block or not _is_pow2(n // block) or (block > 1 and _block_recipe(block) is None):
            raise ValueError(f"hadamard_factors: no construction of order {n} with a block of {block}")
        s = (block, n // block)
    else:
        s = _split(n)
    if s is None:
        return None
    k, p2 = s
    out = [_build_block(k) / math.sqrt(k)] if k > 1 else []
    out += [sylvester(f) / math.sqrt(f) for f in _pow2_sizes(p2, max_factor)]
    return out or [np.ones((1, 1))]


# ----------------------------------------------------------------------------- random rotations


def random_orthogonal(n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Haar-random n×n orthogonal matrix (QR of a Gaussian matrix, signs of diag(R) fixed), float64."""
    n = _check_size(n)
    rng = np.random.default_rng(rng)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d


#: the largest Kronecker group :func:`online_groups` builds by merging consecutive dense factors
ONLINE_GROUP_MAX = 512


def online_groups(factors: list[np.ndarray | None], sizes: list[int] | None = None,
                  max_group: int = ONLINE_GROUP_MAX) -> list[tuple[int, np.ndarray | None]]:
    """Regroup ``kron(F_1, ..., F_r)`` into as few factors as an online rotation should run.

    Consecutive dense factors are merged (their Kronecker product, exact) while the merged size stays
    <= ``max_group``; consecutive identity factors (None) are merged into one identity. Returns
    ``[(size, matrix or None)]`` whose Kronecker product is the input's. Fewer groups means fewer
    MatMul/Transpose nodes in the graph; a group of size f costs f multiply-adds per element.
    """
    sizes = list(sizes) if sizes is not None else [int(f.shape[0]) for f in factors]
    if len(sizes) != len(factors):
        raise ValueError("factors and sizes differ in length")
    out: list[tuple[int, np.ndarray | None]] = []
    for f, size in zip(factors, sizes):
        if out and f is None and out[-1][1] is None:
            out[-1] = (out[-1][0] * size, None)
        elif out and f is not None and out[-1][1] is not None and out[-1][0] * size <= max_group:
            out[-1] = (out[-1][0] * size, np.kron(out[-1][1], f))
        else:
            out.append((int(size), None if f is None else np.asarray(f, np.float64)))
    return out


@dataclass(frozen=True, eq=False)
class Rotation:
    """Randomized rotation ``Q = diag(signs) · kron(*factors)`` (orthogonal, n×n).

    ``kind`` is ``"hadamard"``, ``"hadamard+orthogonal(K)"`` or ``"orthogonal"``.
    """

    signs: np.ndarray
    factors: list[np.ndarray] = field(default_factory=list)
    kind: str = "hadamard"

    @property
    def n(self) -> int:
        """Order of the rotation."""
        return int(self.signs.shape[0])

    @property
    def dense_cost(self) -> int:
        """Multiply-adds per row to apply the factors online: ``n · Σ f_i``."""
        return self.n * sum(int(f.shape[0]) for f in self.factors)

    def mixing(self) -> np.ndarray:
        """Dense ``kron(*factors)`` (without the signs)."""
        h = np.ones((1, 1))
        for f in self.factors:
            h = np.kron(h, f)
        return h

    def matrix(self) -> np.ndarray:
        """Dense ``Q = diag(signs) @ kron(*factors)`` (rows scaled by the signs)."""
        return self.signs[:, None] * self.mixing()

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x @ Q`` along the last axis, via the factors."""
        from onnxqf.maths.fold import kron_apply

        return kron_apply(np.asarray(x) * self.signs, self.factors)


def rotation(
    n: int,
    rng: np.random.Generator | int | None = None,
    *,
    fallback: str = "orthogonal",
    max_factor: int = 16,
) -> Rotation:
    """Random ±1 signs followed by a (normalised) Hadamard mixing of order n.

    Without a full construction: ``fallback="orthogonal"`` uses ``orthogonal(K) ⊗ Sylvester(n/K)``
    with ``K = odd(n)·min(4, 2^v2(n))`` (or a dense random orthogonal n×n when K == n);
    ``fallback="error"`` raises :class:`NoHadamardError`.
    """
    n = _check_size(n)
    max_factor = _check_max_factor(max_factor)
    if fallback not in ("orthogonal", "error"):
        raise ValueError(f"fallback must be 'orthogonal' or 'error', got {fallback!r}")
    rng = np.random.default_rng(rng)
    signs = _readonly(rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0)
    factors = hadamard_factors(n, max_factor)
    if factors is not None:
        kind = "hadamard"
    else:
        if fallback == "error":
            why = (
                "n is not 1, 2 or a multiple of 4"
                if n % 4
                else "no Sylvester/Paley I/Paley II/Williamson/Kronecker construction"
            )
            raise NoHadamardError(f"no Hadamard matrix of order n={n}: {why}")
        k = (n >> _v2(n)) * min(4, 1 << _v2(n))
        factors = [random_orthogonal(k, rng)]
        if k < n:
            factors += [sylvester(f) / math.sqrt(f) for f in _pow2_sizes(n // k, max_factor)]
            kind = f"hadamard+orthogonal({k})"
        else:
            kind = "orthogonal"
    return Rotation(signs=signs, factors=[_readonly(f) for f in factors], kind=kind)
