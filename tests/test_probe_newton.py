"""The exact (Newton) probe fits: sklearn's objective solved to its optimum, for the probe refits."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from gapcache.analyze import probe_stats as ps
from gapcache.analyze.probe_newton import fit_predict_exact, suits


def planted(n, d, K, layers, seed, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % K)
    X = rng.standard_normal((n, layers, d))  # (sample, layer, hidden)
    X[np.arange(n), :, y] += signal
    return X, y, rng


def tight_sklearn(X, y, tr, te):
    """sklearn's probe fitted to its optimum (tol 1e-12): the reference of the exact solver."""
    lr = LogisticRegression(class_weight="balanced", tol=1e-12, max_iter=100000)
    probe = Pipeline([("scale", StandardScaler()), ("logreg", lr)]).fit(X[tr], y[tr])
    return probe.decision_function(X[te]), probe.predict(X[te])


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_decision_values_equal_sklearn_at_its_optimum(K, bootstrap):
    X, y, rng = planted(40, 64, K, 3, seed=K)
    splits = []
    while len(splits) < 5:
        tr = rng.choice(40, 25, replace=bootstrap)  # repeated rows count twice, as in sklearn on X[tr]
        if len(np.unique(y[tr])) == K:
            splits.append((tr, np.setdiff1d(np.arange(40), tr)))
    got = fit_predict_exact(X, y, splits, decision=True)
    labels = fit_predict_exact(X, y, splits)
    for (tr, te), dec, lab in zip(splits, got, labels):
        for layer in range(3):
            ref, pred = tight_sklearn(X[:, layer], y, tr, te)
            np.testing.assert_allclose(dec[layer], ref, atol=2e-5)
            margin = np.abs(ref) if K == 2 else np.abs(np.diff(np.sort(ref, axis=1)[:, -2:], axis=1))[:, 0]
            clear = margin > 1e-4  # rows not on the boundary: the labels must agree
            assert np.array_equal(lab[layer][clear], pred[clear])


@pytest.mark.parametrize("K", [3, 4, 7])
def test_multinomial_fits_live_in_the_sum_zero_logits(K):
    """The K - 1 coordinates the Newton solver uses: an orthonormal basis of the logit vectors that sum to
    zero, so the penalty reads the same; the fitted logits of every row sum to zero (sklearn's optimum
    has no common shift either: its penalty is least without one)."""
    from gapcache.analyze.probe_newton import _sum_zero_basis

    A = _sum_zero_basis(K)
    np.testing.assert_allclose(A.T @ A, np.eye(K - 1), atol=1e-15)
    np.testing.assert_allclose(A.sum(axis=0), 0.0, atol=1e-15)
    X, y, _ = planted(30, 16, K, 2, seed=K)
    dec = fit_predict_exact(X, y, [(np.arange(20), np.arange(20, 30))], decision=True)[0]  # (layer, test, K)
    np.testing.assert_allclose(dec.sum(axis=-1), 0.0, atol=1e-9)


def test_more_hidden_units_than_rows_and_constant_states():
    """d >> training rows (the span has rank < d) and a layer whose states are all equal (no feature at all:
    balanced weights make every intercept 0, the first class predicted, as sklearn's lbfgs does)."""
    X, y, rng = planted(24, 300, 2, 2, seed=1)
    X[:, 1, :] = 0.7
    splits = [(np.arange(0, 18), np.arange(18, 24)), (np.arange(6, 24), np.arange(0, 6))]
    dec = fit_predict_exact(X, y, splits, decision=True)
    for (tr, te), d in zip(splits, dec):
        np.testing.assert_allclose(d[0], tight_sklearn(X[:, 0], y, tr, te)[0], atol=2e-5)
        assert np.all(d[1] == 0.0)
    assert all(np.all(p[1] == 0) for p in fit_predict_exact(X, y, splits))


def test_refits_use_the_exact_solver_and_agree_with_lbfgs_refits():
    """probe_stats' default refits (exact) against the lbfgs lockstep on the same design: the same SEs up to
    a boundary row, and the estimate (lbfgs, sklearn's stopping point) untouched."""
    X, y, _ = planted(48, 32, 2, 3, seed=3, signal=0.6)
    fast = ps.probe_stats(X, y, n_refits=4, seed=0)
    slow = ps.probe_stats(X, y, n_refits=4, seed=0, refit_predict=ps.batched_fit_predict)
    np.testing.assert_array_equal(fast.estimate(), slow.estimate())
    assert np.abs(fast.rep("accuracy") - slow.rep("accuracy")).max() <= 1 / 24 + 1e-12  # one flipped row of a half's 24 (0 here)
    np.testing.assert_allclose(fast.se(), slow.se(), atol=0.02)


def test_suits_only_small_problems():
    assert suits(19, 2048) and suits(13, 128) and suits(800, 16)
    assert not suits(800, 2048) and not suits(40, 128)


def test_a_split_missing_a_class_is_fitted_on_the_classes_it_holds_as_sklearn_fits_it():
    """4 imbalanced classes at n = 32: a half's fold can miss the smallest class in training (and test); the
    batched solvers fit one class set per call, so such splits are fitted in a call of their own class set (a
    split of one class predicts it), as sklearn fits those rows: the lbfgs lockstep gives sklearn's labels,
    the exact solver sklearn's up to rows on the boundary."""
    from gapcache.analyze import probe_sim

    X, y = probe_sim.planted(32, probe_sim.PROPORTIONS[4], 1.0, np.random.default_rng(0), hidden=16, layers=2)
    design = ps.make_design(y, np.random.default_rng(1).permutation(y), n_refits=10, seed=0)
    classes = set(np.unique(y))
    splits = design.splits(True)
    lacking = [(tr, te) for tr, te in splits if set(np.unique(design.y_control[tr])) != classes]
    assert len(lacking) >= 2  # the case is there
    ref = ps.sklearn_fit_predict(X, design.y_control, lacking)
    for fit, most in ((ps.batched_fit_predict, 0), (ps.exact_fit_predict, 2)):
        got = fit(X, design.y_control, lacking)
        assert all(set(np.unique(g)) <= set(np.unique(design.y_control[tr])) for g, (tr, _) in zip(got, lacking))
        assert sum(int((g != r).sum()) for g, r in zip(got, ref)) <= most, fit.__name__
        scores = ps.refit_scores(X, design, fit_predict=fit)
        assert np.isfinite(scores["control"]).all() and scores["control"].shape == (20, 2)
