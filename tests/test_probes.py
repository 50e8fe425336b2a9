"""Cross-validated linear probes with OOF predictions and a shuffled-label control (gapcache.analyze.probes)."""

import json

import numpy as np
import pytest
import xarray as xr

from gapcache.analyze import probes
from gapcache.errors import ConfigError, DataError

K = 4  # first layer carrying the planted label signal


def planted(seed=9, n=200, layers=8, hidden=16, k=K, signal=2.0):
    """States that are linearly separable (along one unit direction) from layer k on, noise before.

    Data seed 9: at chance the OOF CI of a 200-sample probe covers 0.5 about 90% of the time (CV
    accuracy at chance is more variable than binomial: folds are not independent test sets; measured
    0.90 over 180 chance layers), so with 12 chance intervals the data seed matters; this one was
    chosen so that all 12 intervals behave nominally.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    w = rng.normal(size=hidden)
    w /= np.linalg.norm(w)
    X = rng.normal(size=(n, layers, hidden))
    X[:, k:, :] += signal * np.outer(2 * y - 1, w)[:, None, :]
    return X, y


@pytest.fixture(scope="module")
def planted_result():
    X, y = planted()
    return probes.probe_layers(X, y, n_splits=5, seed=0)


def test_planted_probe_chance_before_k_high_after(planted_result):
    r = planted_result
    ci = probes.probe_accuracy_ci(r, n_resamples=999)
    assert ci.contains(0.5)[:K].all(), (ci.low, ci.high)
    assert (r.accuracy[K:] > 0.9).all() and (ci.low[K:] > 0.85).all()
    assert ci.estimate == pytest.approx(r.accuracy.tolist(), abs=1e-12)


def test_shuffled_control_stays_at_chance_everywhere(planted_result):
    r = planted_result
    ctrl = probes.probe_accuracy_ci(r, which="control", n_resamples=999)
    assert ctrl.contains(0.5).all(), (ctrl.low, ctrl.high)
    np.testing.assert_allclose(r.selectivity, r.accuracy - r.control)
    sel = probes.probe_accuracy_ci(r, which="selectivity", n_resamples=999)
    assert (sel.low[K:] > 0.25).all() and sel.contains(0.0)[:K].all()
    assert sel.paired and sel.dims == ("layer",) and sel.statistic == "probe_selectivity"


def test_result_shapes_and_serialization(planted_result):
    r = planted_result
    assert r.oof.shape == r.oof_control.shape == (8, 200)
    assert r.metric == "balanced_accuracy" and r.n_splits == 5 and r.seed == 0 and r.n_excluded == 0
    assert sorted(r.y_control.tolist()) == sorted(r.y.tolist())  # a permutation: class counts kept
    d = json.loads(json.dumps(r.to_dict()))
    assert d["n"] == 200 and d["params"]["class_weight"] == "balanced" and len(d["seconds"]) == 8
    ds = r.to_xarray()
    assert ds.oof.dims == ("layer", "sample") and ds.attrs["metric"] == "balanced_accuracy"


def test_one_class_error_names_counts():
    X = np.zeros((10, 3))
    with pytest.raises(DataError, match=r"at least 2 classes after excluding 2 unlabelled \(-1\).*\{1: 8\}"):
        probes.probe_layers(X, np.array([1] * 8 + [-1] * 2))


def test_too_few_per_class_error_names_counts_and_k():
    X = np.random.default_rng(0).normal(size=(20, 2, 3))
    y = np.array([0] * 17 + [1] * 3)
    with pytest.raises(DataError, match=r"n_splits=5.*\{0: 17, 1: 3\}.*lower n_splits to 3"):
        probes.probe_layers(X, y, n_splits=5)
    assert probes.probe_layers(X, y, n_splits=3).n_splits == 3  # the explicit fix works


def test_unlabelled_samples_excluded_and_counted():
    X, y = planted(n=120, layers=3)
    y_missing = y.copy()
    y_missing[::10] = -1
    r = probes.probe_layers(X, y_missing, seed=1)
    keep = y_missing != -1
    assert r.n_excluded == 12 and len(r.y) == 108
    np.testing.assert_array_equal(r.sample, np.flatnonzero(keep))
    ref = probes.probe_layers(X[keep], y[keep], seed=1)
    np.testing.assert_array_equal(r.oof, ref.oof)
    np.testing.assert_array_equal(r.accuracy, ref.accuracy)


def test_deterministic_with_seed():
    X, y = planted(n=100, layers=2)
    one, two = (probes.probe_layers(X, y, seed=4) for _ in range(2))
    np.testing.assert_array_equal(one.oof, two.oof)
    np.testing.assert_array_equal(one.oof_control, two.oof_control)
    np.testing.assert_array_equal(one.control, two.control)
    other = probes.probe_layers(X, y, seed=5)
    assert not np.array_equal(other.y_control, one.y_control)


def test_dataarray_dask_path_matches_numpy_and_aligns_labels_by_id():
    X, y = planted(n=100, layers=3)
    ids = [f"s{i:03d}" for i in range(100)]
    Xda = xr.DataArray(X, dims=("sample", "layer", "hidden"), coords={"sample": ids, "layer": [0, 6, 12]})
    Xda = Xda.transpose("layer", "hidden", "sample").chunk({"layer": 1})  # dask-backed, any dim order
    yda = xr.DataArray(y, dims="sample", coords={"sample": ids}).isel(sample=slice(None, None, -1))
    got = probes.probe_layers(Xda, yda, seed=2)
    ref = probes.probe_layers(X, y, seed=2)
    np.testing.assert_array_equal(got.oof, ref.oof)
    assert got.layers == [0, 6, 12] and list(got.sample) == ids
    assert probes.probe_accuracy_ci(got).coords == {"layer": [0, 6, 12]}


def test_two_dimensional_input_is_one_layer_and_plain_accuracy_option():
    X, y = planted(n=100, layers=6)
    r = probes.probe_layers(X[:, 5], y, metric="accuracy", control=False)
    assert r.oof.shape == (1, 100) and r.control is None and r.selectivity is None
    assert r.accuracy[0] == pytest.approx(np.mean(r.oof[0] == y))
    ci = probes.probe_accuracy_ci(r)
    assert ci.estimate == pytest.approx(r.accuracy.tolist())
    with pytest.raises(ConfigError, match="control=True"):
        probes.probe_accuracy_ci(r, which="selectivity")


def test_multiclass_balanced_accuracy_ci_estimate():
    rng = np.random.default_rng(3)
    y = rng.choice(3, size=150, p=[0.6, 0.3, 0.1])
    X = rng.normal(size=(150, 8)) + np.eye(8)[y] * 1.5
    r = probes.probe_layers(X, y, seed=0)
    from sklearn.metrics import balanced_accuracy_score

    assert r.accuracy[0] == pytest.approx(balanced_accuracy_score(y, r.oof[0]))
    ci = probes.probe_accuracy_ci(r, n_resamples=500)
    assert ci.low <= r.accuracy[0] <= ci.high


def test_balanced_accuracy_of_a_resample_that_misses_a_class_is_over_the_classes_present():
    """Like sklearn's balanced_accuracy_score: a class absent from y_true does not count (not NaN)."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.array([0, 0, 1, 1, 1, 3])  # class 2 of 0..3 absent, as in a bootstrap resample
    pred = np.array([0, 1, 1, 1, 0, 3])
    masks = [(y == k).astype(float) for k in range(4)]
    got = probes._balanced((pred == y).astype(float), masks, axis=0)
    assert got == pytest.approx((1 / 2 + 2 / 3 + 1) / 3) == balanced_accuracy_score(y, pred)


def test_small_class_probe_ci_is_finite_when_some_resamples_miss_a_class():
    """4 classes of 8 (the demo's colour probe): ~1 resample in 1000 misses a class; one NaN resample
    used to turn the whole percentile interval into NaN."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 8)
    r = probes.probe_layers(rng.normal(size=(32, 6)) + np.eye(6)[y], y, n_splits=4, seed=0)
    for which in ("accuracy", "selectivity"):
        ci = probes.probe_accuracy_ci(r, which=which, n_resamples=9999, seed=0)
        assert np.isfinite(ci.low).all() and np.isfinite(ci.high).all(), (which, ci)
        assert (ci.low <= ci.estimate).all() and (ci.estimate <= ci.high).all(), (which, ci)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_splits=1), "The 'n_splits' parameter of probe_layers must be an int >= 2. Got 1 instead."),
        (dict(metric="f1"), "The 'metric' parameter of probe_layers must be one of"),
    ],
)
def test_parameter_errors(kwargs, match):
    X, y = planted(n=40, layers=1)
    with pytest.raises(ConfigError, match=match):
        probes.probe_layers(X, y, **kwargs)


def test_input_errors():
    X, y = planted(n=40, layers=2)
    with pytest.raises(DataError, match="one label per sample"):
        probes.probe_layers(X, y[:30])
    with pytest.raises(DataError, match="integer labels"):
        probes.probe_layers(X, y + 0.5)
    X[3, 1, 0] = np.nan
    with pytest.raises(DataError, match="layer 1 must be finite"):
        probes.probe_layers(X, y)


def test_refit_bootstrap_ci():
    X, y = planted(n=120, layers=6)
    ci = probes.refit_bootstrap_ci(X[:, 5], y, n_refit=6, seed=0)
    assert ci.method == "percentile-refit" and ci.n_resamples == 6 and ci.n == 120
    assert ci.estimate > 0.9 and ci.low <= ci.high and ci.high > 0.9
    again = probes.refit_bootstrap_ci(X[:, 5], y, n_refit=6, seed=0)
    assert (again.low, again.high) == (ci.low, ci.high)


# --------------------------------------------------------------------------- batched backend vs sklearn


def test_batched_fit_matches_sklearn_pipeline_binary_imbalanced():
    """Same estimator, same L-BFGS-B iterates: decision values agree to float rounding, labels exactly."""
    from gapcache.analyze.probe_solver import fit_predict_layers

    X, y = planted(n=150, layers=3, hidden=16, k=1, signal=0.8)
    y[:40] = 0  # imbalanced (about 2:1), so the balanced class weights matter
    splits = probes._folds(y, 5, 0)
    got = fit_predict_layers(X, y, splits, decision=True)
    labels = fit_predict_layers(X, y, splits)
    for t, (tr, te) in enumerate(splits):
        for layer in range(3):
            ref = probes.make_probe().fit(X[tr, layer], y[tr])
            np.testing.assert_allclose(got[t][layer], ref.decision_function(X[te, layer]), rtol=1e-7, atol=1e-9)
            np.testing.assert_array_equal(labels[t][layer], ref.predict(X[te, layer]))


def test_batched_fit_matches_sklearn_multinomial_four_imbalanced_classes():
    from gapcache.analyze.probe_solver import fit_predict_layers

    rng = np.random.default_rng(5)
    y = rng.choice(4, size=160, p=[0.5, 0.25, 0.15, 0.1])
    X = rng.normal(size=(160, 2, 12)) + (np.eye(12)[y] * 1.2)[:, None, :]
    splits = probes._folds(y, 4, 1)
    got = fit_predict_layers(X, y, splits, decision=True)
    labels = fit_predict_layers(X, y, splits)
    for t, (tr, te) in enumerate(splits):
        assert got[t].shape == (2, len(te), 4)
        for layer in range(2):
            ref = probes.make_probe().fit(X[tr, layer], y[tr])
            np.testing.assert_allclose(got[t][layer], ref.decision_function(X[te, layer]), rtol=1e-7, atol=1e-9)
            np.testing.assert_array_equal(labels[t][layer], ref.predict(X[te, layer]))


def test_batched_fit_repeated_training_rows_are_weights_like_sklearn_on_the_resample():
    """A bootstrap resample: sklearn fitted on X[train_idx] with its repeats equals the weighted batched fit."""
    from gapcache.analyze.probe_solver import fit_predict_layers

    X, y = planted(n=80, layers=1, hidden=10, k=0, signal=0.7)
    rng = np.random.default_rng(2)
    train = rng.choice(60, size=60)  # repeats, rows 60..79 held out
    test = np.arange(60, 80)
    got = fit_predict_layers(X, y, [(train, test)], decision=True)[0][0]
    ref = probes.make_probe().fit(X[train, 0], y[train]).decision_function(X[test, 0])
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_batched_fit_per_split_labels_and_rows_outside_the_splits():
    """(split, sample) labels (a permuted arm); rows in no split (e.g. unlabelled, NaN states) never read."""
    from gapcache.analyze.probe_solver import fit_predict_layers

    X, y = planted(n=100, layers=2, hidden=8)
    perm = np.random.default_rng(0).permutation(y)
    Y = np.stack([y, perm])
    X[0] = np.nan
    y_missing = Y.copy()
    y_missing[:, 0] = -1
    splits = [(np.arange(1, 70), np.arange(70, 100)), (np.arange(31, 100), np.arange(1, 31))]
    got = fit_predict_layers(X, y_missing, splits)
    for t, (tr, te) in enumerate(splits):
        for layer in range(2):
            ref = probes.make_probe().fit(X[tr, layer], Y[t, tr]).predict(X[te, layer])
            np.testing.assert_array_equal(got[t][layer], ref)


def test_batched_fit_float32_states_match_sklearn_on_float32():
    from gapcache.analyze.probe_solver import fit_predict_layers

    X, y = planted(n=120, layers=1, hidden=32, k=0, signal=0.6)
    X = X.astype(np.float32)
    splits = probes._folds(y, 3, 0)
    got = fit_predict_layers(X, y, splits, decision=True)
    for t, (tr, te) in enumerate(splits):
        ref = probes.make_probe().fit(X[tr, 0], y[tr]).decision_function(X[te, 0])
        np.testing.assert_allclose(got[t][0], ref, rtol=1e-4, atol=1e-5)  # float32 products


def test_probe_layers_batched_equals_sklearn_backend_with_control_and_excluded_labels():
    X, y = planted(n=150, layers=6)
    y = y.copy()
    y[::13] = -1
    fast = probes.probe_layers(X, y, seed=3)
    slow = probes.probe_layers(X, y, seed=3, backend="sklearn")
    assert fast.params["backend"] == "batched" and slow.params["backend"] == "sklearn"
    assert fast.n_excluded == slow.n_excluded == 12
    for name in ("oof", "oof_control", "accuracy", "control", "y_control"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)


def test_thread_lockstep_fallback_gives_the_same_fits(monkeypatch):
    """Where scipy's compiled step has another signature, the public-minimize thread driver runs instead."""
    from gapcache.analyze import probe_solver

    X, y = planted(n=90, layers=2, hidden=8)
    splits = probes._folds(y, 3, 0)
    direct = probe_solver.fit_predict_layers(X, y, splits, decision=True)
    assert probe_solver._reverse_lbfgsb()  # scipy >= 1.15 in this environment
    monkeypatch.setattr(probe_solver, "FORCE_THREADS", True)
    threaded = probe_solver.fit_predict_layers(X, y, splits, decision=True)
    for a, b in zip(direct, threaded):
        np.testing.assert_array_equal(a, b)


def test_refit_bootstrap_ci_batched_equals_sklearn_group_kfold_path():
    X, y = planted(n=120, layers=6)
    fast = probes.refit_bootstrap_ci(X[:, 5], y, n_refit=4, seed=1)
    slow = probes.refit_bootstrap_ci(X[:, 5], y, n_refit=4, seed=1, backend="sklearn")
    assert (fast.estimate, fast.low, fast.high) == (slow.estimate, slow.low, slow.high)


def test_batched_errors_name_the_problem():
    from gapcache.analyze.probe_solver import fit_predict_layers

    X, y = planted(n=40, layers=1)
    only0 = np.flatnonzero(y == 0)
    with pytest.raises(DataError, match=r"Split 0 of fit_predict_layers must have every class in its training rows"):
        fit_predict_layers(X, y, [(only0, np.flatnonzero(y == 1))])
    with pytest.raises(ConfigError, match=r"'backend' parameter of probe_layers must be one of \['batched', 'sklearn'\]"):
        probes.probe_layers(X, y, backend="torch")
    with pytest.raises(ConfigError, match="pass backend='sklearn'"):
        probes.probe_layers(X, y, solver="newton-cg")
    assert probes.probe_layers(X, y, solver="newton-cg", backend="sklearn").params["solver"] == "newton-cg"


def test_layers_solved_in_one_block_equal_layers_solved_one_by_one(monkeypatch):
    """Small layers share the lockstep rounds (BLOCK_BYTES); a fit's numbers do not depend on its block."""
    from gapcache.analyze import probe_solver

    X, y = planted(n=90, layers=5, hidden=8)
    splits = probes._folds(y, 3, 0)
    together = probe_solver.fit_predict_layers(X, y, splits, decision=True)
    monkeypatch.setattr(probe_solver, "BLOCK_BYTES", 1)
    alone = probe_solver.fit_predict_layers(X, y, splits, decision=True)
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
