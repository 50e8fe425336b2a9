"""Cross-modal geometry of one sample's token states (DESIGN.md, "Cross-modal geometry"). numpy only.

Linear CKA with the debiased HSIC estimator (Song et al. 2012, eq. 5; Kornblith et al. 2019, sec. 3
and appendix). For kernels K, L over the same n examples, with K~, L~ = K, L with zeroed diagonals::

    HSIC_1(K, L) = [ tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1 ] / (n(n-3))
    CKA(K, L)    = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))

HSIC_1 is an unbiased estimate of HSIC (no finite-n bias from the diagonal, which in a residual stream is
dominated by the few "massive" hidden units); it can be slightly negative, and so can CKA.

**Two token sets of different sizes** (n_v visual tokens V, n_t text tokens T, rows in the same
d-dimensional residual stream) share no examples for token-by-token Gram matrices (n_v x n_v against
n_t x n_t: CKA needs the same n). They share the hidden units. gapcache therefore takes the d hidden
units as the examples and each set's tokens as its features (it compares features across tokens)::

    Vc = V - mean over V's tokens,  Tc = T - mean over T's tokens     (each set centred over its tokens)
    K  = Vc' Vc  (d x d),           L  = Tc' Tc  (d x d)              (n = d examples)
    cross_modal_cka(V, T) = CKA(K, L)

K and L are the two sets' token scatter matrices in the residual stream, so the CKA asks whether the
visual and the text tokens spread along the same directions with the same relative spread: it is 1 when
one scatter is a multiple of the other (the same subspace with the same shape, whatever n_v and n_t),
and 0 when the sets lie in orthogonal coordinate subspaces (tests/test_geometry.py). For orthogonal
subspaces that are not coordinate-aligned tr(KL) = 0 but the estimator's diagonal corrections (the a.b,
1'K~L~1 and (1'K~1)(1'L~1) terms) do not vanish: the debiased CKA is then 0 only in expectation
(-0.013 on the seeded d = 256 case of the tests). Centring over tokens keeps a direction that every token
shares (the attention-sink / massive-activation direction) from making any two sets alike; it is the
centring of the effective rank (gapcache.analyze.rank). Seed: DESIGN.md names the seed's ``cka`` but
neither it nor docs/seed-compatibility.md states its estimator or how it pairs tokens; no seed number
is reproduced here.

The d x d kernels are never formed: with a = diag(K) (column sums of Vc**2) and b = diag(L),
tr(K~L~) = ||Vc Tc'||_F^2 - a.b, 1'K~1 = ||Vc 1||^2 - sum(a), K~1 = Vc'(Vc 1) - a, so one CKA costs
O(n_v n_t d) (n_v, n_t << d in a VLM).

ICC ("intra-modal cosine concentration", seed: ``cosine_concentration``): the mean pairwise cosine
similarity among one sample's visual tokens, over unordered pairs i < j::

    u_i = v_i / ||v_i||,  ICC = sum_{i<j} u_i.u_j / (n(n-1)/2) = (||sum_i u_i||^2 - n) / (n(n-1))

Uncentred (it measures how much the tokens point the same way); tokens of zero norm have no direction
and are left out; fewer than two tokens give NaN. n identical tokens give 1 (up to float64 rounding).

Usage::

    from gapcache.analyze.geometry import cross_modal_cka, icc, cka_debiased
    cross_modal_cka(V, T)      # V (..., n_v, d), T (..., n_t, d) -> (...)
    icc(V)                     # V (..., n, d) -> (...)
    cka_debiased(K, L)         # Gram matrices (..., n, n) of the same n examples -> (...)
"""

from __future__ import annotations

import numpy as np

from gapcache.errors import ConfigError


def _check(x, name: str, func: str, ndim: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < ndim:
        raise ConfigError(f"The {name!r} parameter of {func} must have at least {ndim} dimensions "
                          f"(..., tokens, hidden). Got shape {x.shape} instead.")
    return x


def hsic_debiased(K, L) -> np.ndarray:
    """HSIC_1(K, L) (module docstring) of Gram matrices (..., n, n) over the same n > 3 examples -> (...)."""
    K, L = _check(K, "K", "hsic_debiased"), _check(L, "L", "hsic_debiased")
    n = K.shape[-1]
    if n < 4 or K.shape[-2:] != (n, n) or L.shape[-2:] != (n, n):
        raise ConfigError(f"The 'K' and 'L' parameters of hsic_debiased must be square Gram matrices over the same "
                          f"n >= 4 examples. Got shapes {K.shape} and {L.shape} instead.")
    eye = np.eye(n, dtype=bool)
    Kt, Lt = np.where(eye, 0.0, K), np.where(eye, 0.0, L)
    k1, l1 = Kt.sum(axis=-1), Lt.sum(axis=-1)  # K~1, L~1: (..., n)
    tr = np.einsum("...ij,...ji->...", Kt, Lt)
    return (tr + k1.sum(-1) * l1.sum(-1) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * np.einsum("...i,...i->...", k1, l1)) / (n * (n - 3))


def _ratio(kl, kk, ll) -> np.ndarray:
    den = np.sqrt(np.clip(kk, 0.0, None) * np.clip(ll, 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, kl / np.where(den > 0, den, 1.0), np.nan)


def cka_debiased(K, L) -> np.ndarray:
    """CKA(K, L) = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)); NaN where a kernel has HSIC_1 <= 0."""
    return _ratio(hsic_debiased(K, L), hsic_debiased(K, K), hsic_debiased(L, L))


def _scatter_terms(A):
    """Of K = A'A (A: (..., tokens, d)): a = diag(K) (..., d), K~1 = A'(A1) - a (..., d), 1'K~1 (...)."""
    a = np.einsum("...ti,...ti->...i", A, A)
    rows = A.sum(axis=-1)  # A1: (..., tokens)
    k1 = np.einsum("...ti,...t->...i", A, rows) - a
    return a, k1, np.einsum("...t,...t->...", rows, rows) - a.sum(-1)


def _hsic_tokens(A, B, ta, tb, n: int) -> np.ndarray:
    """HSIC_1(A'A, B'B) over the n = d hidden units, from token-space products only."""
    (a, k1, s_a), (b, l1, s_b) = ta, tb
    cross = A @ np.swapaxes(B, -1, -2)  # (..., n_a, n_b)
    tr = np.einsum("...ij,...ij->...", cross, cross) - np.einsum("...i,...i->...", a, b)
    return (tr + s_a * s_b / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * np.einsum("...i,...i->...", k1, l1)) / (n * (n - 3))


def cross_modal_cka(V, T, *, center: bool = True) -> np.ndarray:
    """Debiased linear CKA between token sets V (..., n_v, d) and T (..., n_t, d) over the d hidden units
    (module docstring): CKA(Vc'Vc, Tc'Tc), each set centred over its tokens unless ``center=False``.
    NaN where a set has no spread (one token, or all tokens equal)."""
    V, T = _check(V, "V", "cross_modal_cka"), _check(T, "T", "cross_modal_cka")
    d = V.shape[-1]
    if T.shape[-1] != d or d < 4:
        raise ConfigError(f"The 'V' and 'T' parameters of cross_modal_cka must share a hidden size d >= 4. "
                          f"Got shapes {V.shape} and {T.shape} instead.")
    if center:
        V, T = V - V.mean(axis=-2, keepdims=True), T - T.mean(axis=-2, keepdims=True)
    tv, tt = _scatter_terms(V), _scatter_terms(T)
    return _ratio(_hsic_tokens(V, T, tv, tt, d), _hsic_tokens(V, V, tv, tv, d), _hsic_tokens(T, T, tt, tt, d))


def icc(V) -> np.ndarray:
    """Mean pairwise cosine similarity among the tokens of V (..., n, d) over pairs i < j -> (...);
    zero-norm tokens left out, NaN with fewer than two (module docstring)."""
    V = _check(V, "V", "icc")
    norm = np.linalg.norm(V, axis=-1)  # (..., n)
    keep = norm > 0
    u = np.where(keep[..., None], V / np.where(keep, norm, 1.0)[..., None], 0.0)
    s = u.sum(axis=-2)
    m = keep.sum(axis=-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m >= 2, (np.einsum("...i,...i->...", s, s) - m) / (m * (m - 1)), np.nan)
