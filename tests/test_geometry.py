"""Cross-modal geometry on planted matrices: debiased CKA between token sets, ICC among tokens, exactly."""

import numpy as np
import pytest

from gapcache.analyze.geometry import cka_debiased, cross_modal_cka, hsic_debiased, icc
from gapcache.errors import ConfigError

RNG = np.random.default_rng(0)


def test_hsic_debiased_is_song_et_al_eq5_on_a_small_case():
    # n = 4 examples: HSIC_1 = [tr(K~L~) + (1'K~1)(1'L~1)/6 - 1'K~L~1] / 4, by hand on integer matrices
    K = np.array([[9, 1, 2, 0], [1, 9, 0, 3], [2, 0, 9, 1], [0, 3, 1, 9]], float)
    L = np.array([[5, 2, 0, 1], [2, 5, 1, 0], [0, 1, 5, 2], [1, 0, 2, 5]], float)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    tr = np.trace(Kt @ Lt)  # 2*(1*2 + 2*0 + 0*1 + 0*1 + 3*0 + 1*2) = 8
    assert tr == 8
    want = (tr + Kt.sum() * Lt.sum() / 6 - np.ones(4) @ Kt @ Lt @ np.ones(4)) / 4
    assert hsic_debiased(K, L) == pytest.approx(want, rel=1e-15)


def test_token_space_cka_equals_the_explicit_gram_formula():
    V, T = RNG.normal(size=(3, 20, 64)), RNG.normal(size=(3, 7, 64)) + RNG.normal(size=(3, 1, 64))
    got = cross_modal_cka(V, T)  # batched over 3 layers
    Vc, Tc = V - V.mean(-2, keepdims=True), T - T.mean(-2, keepdims=True)
    K, L = np.swapaxes(Vc, -1, -2) @ Vc, np.swapaxes(Tc, -1, -2) @ Tc  # (3, 64, 64)
    np.testing.assert_allclose(got, cka_debiased(K, L), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(cross_modal_cka(V, T, center=False),
                               cka_debiased(np.swapaxes(V, -1, -2) @ V, np.swapaxes(T, -1, -2) @ T), rtol=1e-10)


def test_identical_subspaces_give_cka_one_whatever_the_token_counts():
    basis = np.linalg.qr(RNG.normal(size=(128, 5)))[0].T  # 5 orthonormal directions in d = 128
    V = RNG.normal(size=(16, 5)) @ basis + 3.0  # 16 tokens, with a shared offset (removed by centring)
    assert cross_modal_cka(V, V) == pytest.approx(1.0, abs=1e-12)
    assert cross_modal_cka(V, np.concatenate([V, V, V])) == pytest.approx(1.0, abs=1e-12)  # 48 tokens: L = 3K
    Q = np.linalg.qr(RNG.normal(size=(16, 16)))[0]  # other tokens, same scatter: (QVc)'(QVc) = Vc'Vc
    Vc = V - V.mean(0)
    assert cross_modal_cka(Vc, Q @ Vc, center=False) == pytest.approx(1.0, abs=1e-12)
    assert cross_modal_cka(2.5 * V - 1.0, V) == pytest.approx(1.0, abs=1e-12)  # scale and shift


def test_orthogonal_coordinate_subspaces_give_cka_zero_exactly():
    d = 32
    V = np.zeros((12, d))
    V[:, :4] = RNG.normal(size=(12, 4))  # visual tokens spread over hidden units 0..3
    R = np.array([[1, 1, 0], [1, 0, -1]], float)  # text tokens on units 5, 9, 11 (and their negatives)
    T = np.zeros((4, d))
    T[:, [5, 9, 11]] = np.vstack([R, -R])
    # L = T'T has off-diagonal entries (so HSIC_1(L, L) > 0) that sum to 0 (so 1'L~1 = 0): every term of
    # HSIC_1(K, L) is then a sum of exact zeros, not a rounding residue
    L = T.T @ T
    assert (L - np.diag(np.diag(L))).any() and (L - np.diag(np.diag(L))).sum() == 0
    assert cross_modal_cka(V, T) == 0.0
    assert cross_modal_cka(V + 7.0, T - 2.0) == 0.0  # offsets are centred away


def test_generic_orthogonal_subspaces_are_zero_only_in_expectation():
    # tr(KL) = ||Vc Tc'||^2 = 0 for orthogonal subspaces, but the debiased estimator's diagonal corrections
    # (a.b, 1'K~L~1, (1'K~1)(1'L~1)) do not vanish when the subspaces are not coordinate-aligned
    d = 256
    basis = np.linalg.qr(RNG.normal(size=(d, 8)))[0].T
    V, T = RNG.normal(size=(30, 4)) @ basis[:4], RNG.normal(size=(10, 4)) @ basis[4:]
    Vc, Tc = V - V.mean(0), T - T.mean(0)
    assert np.abs(Vc @ Tc.T).max() < 1e-12
    got = float(cross_modal_cka(V, T))
    assert got != 0.0 and abs(got) < 0.05  # measured: -0.013 (seeded)
    aligned = cross_modal_cka(V, RNG.normal(size=(10, 4)) @ basis[:4])
    assert aligned > 0.5  # the same subspace, another spread: far from the orthogonal case


def test_a_set_without_spread_gives_nan_and_bad_shapes_are_named():
    V = RNG.normal(size=(8, 16))
    assert np.isnan(cross_modal_cka(V, np.ones((3, 16))))  # every text token equal: no scatter
    assert np.isnan(cross_modal_cka(V, V[:1]))  # one token
    with pytest.raises(ConfigError, match=r"must share a hidden size d >= 4. Got shapes \(8, 16\) and \(3, 8\)"):
        cross_modal_cka(V, np.ones((3, 8)))
    with pytest.raises(ConfigError, match="'K' and 'L' parameters of hsic_debiased must be square"):
        hsic_debiased(np.eye(3), np.eye(3))


def test_icc_identical_tokens_one_orthogonal_zero_opposite_pairs_known():
    v = RNG.normal(size=64)
    assert icc(np.tile(v, (10, 1))) == pytest.approx(1.0, abs=1e-12)
    assert icc(np.tile(v, (10, 1)) * np.arange(1, 11)[:, None]) == pytest.approx(1.0, abs=1e-12)  # norms differ
    assert icc(np.eye(5, 64)) == 0.0  # orthogonal tokens
    # tokens e0, e0, -e0: pairs (+1, -1, -1) -> mean -1/3
    x = np.zeros((3, 4))
    x[:, 0] = [1.0, 2.0, -1.0]
    assert icc(x) == pytest.approx(-1 / 3, abs=1e-15)
    # a zero token is left out; fewer than two tokens: NaN
    assert icc(np.vstack([x, np.zeros(4)])) == pytest.approx(-1 / 3, abs=1e-15)
    assert np.isnan(icc(x[:1])) and np.isnan(icc(np.zeros((4, 4))))


def test_icc_equals_the_mean_over_pairs_batched():
    V = RNG.normal(size=(2, 3, 9, 16))  # (condition, layer, tokens, hidden)
    U = V / np.linalg.norm(V, axis=-1, keepdims=True)
    C = U @ np.swapaxes(U, -1, -2)
    iu = np.triu_indices(9, 1)
    np.testing.assert_allclose(icc(V), C[..., iu[0], iu[1]].mean(-1), rtol=1e-12)
