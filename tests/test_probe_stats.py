"""Refit-based probe statistics (gapcache.analyze.probe_stats): exact unit values and simulated coverage."""

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import balanced_accuracy_score

from gapcache.analyze import probe_sim as sim
from gapcache.analyze import probe_stats as ps
from gapcache.analyze import probes
from gapcache.errors import ConfigError, DataError


def data(n=60, signal=1.0, layers=3, seed=0, proportions=(0.5, 0.5)):
    return sim.planted(n, proportions, signal, np.random.default_rng(seed), hidden=8, layers=layers,
                       signal_layers=[layers - 1])


def test_cross_validate_with_sklearn_is_probe_layers_exactly():
    X, y = data()
    a, b = probes.probe_layers(X, y, seed=3), ps.cross_validate(X, y, seed=3)
    np.testing.assert_array_equal(a.oof, b.oof)
    np.testing.assert_array_equal(a.oof_control, b.oof_control)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    np.testing.assert_array_equal(a.selectivity, b.selectivity)


def test_score_layers_gives_sklearns_balanced_accuracy_and_accuracy_exactly():
    from sklearn.metrics import accuracy_score

    rng = np.random.default_rng(1)
    for k in (2, 3, 4, 8):
        y = rng.choice(k, size=50, p=np.r_[0.5, np.full(k - 1, 0.5 / (k - 1))])
        pred = rng.integers(0, k, size=(6, 50))
        assert probes.score_layers(y, pred).tolist() == [balanced_accuracy_score(y, p) for p in pred]
        assert probes.score_layers(y, pred, "accuracy").tolist() == [accuracy_score(y, p) for p in pred]
        assert probes.score(y, pred[0]) == balanced_accuracy_score(y, pred[0])


@pytest.mark.parametrize("scheme", ["halves", "bootstrap"])
def test_design_is_stratified_and_never_puts_a_sample_on_both_sides(scheme):
    y = np.repeat([0, 1, 2], [10, 7, 5])
    ctrl = np.random.default_rng(0).permutation(y)
    d = ps.make_design(y, ctrl, n_refits=6, n_splits=4, seed=2, scheme=scheme)
    assert d.n_refits == 6 and d.index.shape == ((12, 10) if scheme == "halves" else (6, 22))
    want = np.array([5, 3, 2]) if scheme == "halves" else np.bincount(y)  # floor(n_k / 2) per half
    for idx, folds, folds_c in zip(d.index, d.folds, d.folds_control):
        np.testing.assert_array_equal(np.bincount(y[idx]), want)
        for labels, fs in ((y, folds), (ctrl, folds_c)):
            for tr, te in fs:
                assert not set(idx[tr]) & set(idx[te])
                assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(idx)))
                # stratified: each class's distinct samples dealt to the folds in turn
                for c in np.unique(labels[idx]):
                    k = len(np.unique(idx[labels[idx] == c]))
                    assert len(np.unique(idx[te][labels[idx[te]] == c])) in (k // 4, -(-k // 4))
    one = ps.make_design(np.repeat([0, 1, 2, 3], 8), n_refits=2, n_splits=5, seed=0)  # halves of 4 per class
    for folds in one.folds:  # 16 samples over 5 folds: every fold gets test samples (3 or 4)
        assert len(folds) == 5 and sorted(len(te) for _, te in folds) == [3, 3, 3, 3, 4]
    if scheme == "halves":
        for r in range(6):
            assert not set(d.index[2 * r]) & set(d.index[2 * r + 1])  # disjoint halves
    again = ps.make_design(y, ctrl, n_refits=6, n_splits=4, seed=2, scheme=scheme)
    np.testing.assert_array_equal(again.index, d.index)


def test_standard_error_of_halves_and_of_the_bootstrap():
    rep = np.array([[0.6, 0.5], [0.4, 0.5], [0.7, 0.9], [0.5, 0.5]])  # (2R, layer): halves (0, 1), (2, 3)
    se, df = ps.standard_error(rep, "halves")
    np.testing.assert_allclose(se, np.sqrt([(0.2**2 + 0.2**2) / 2 / 4, (0 + 0.4**2) / 2 / 4]), rtol=1e-12)
    assert df == 2
    se, df = ps.standard_error(rep, "bootstrap")
    np.testing.assert_allclose(se, rep.std(axis=0, ddof=1), rtol=1e-12)
    assert df == 3


def test_welch_df_of_class_counts_and_the_combined_refit_df():
    assert ps.welch_df({0: 24, 1: 24}) == pytest.approx(46, rel=1e-12)  # equal classes: n - K
    v = 1 / np.array([20, 12, 9, 7])  # balanced accuracy of 4 classes: v_k = 1 / (K^2 n_k), the K^2 cancels
    assert ps.welch_df([20, 12, 9, 7]) == pytest.approx(v.sum()**2 / np.sum(v**2 / np.array([19, 11, 8, 6])), rel=1e-12)
    assert ps.welch_df([20, 12, 9, 7]) == pytest.approx(26.3, abs=0.05)
    w = np.array([30, 10]) / 40  # plain accuracy: w_k = n_k / n, a mean of 40 samples
    v = w**2 / np.array([30, 10])
    assert ps.welch_df([30, 10], "accuracy") == pytest.approx(v.sum()**2 / np.sum(v**2 / np.array([29, 9])), rel=1e-12)
    assert ps.refit_df(10) == 10 and ps.refit_df(10, 40) == pytest.approx(8.0, rel=1e-12)
    rep = np.array([[0.6, 0.5], [0.4, 0.5], [0.7, 0.9], [0.5, 0.5]])
    assert ps.standard_error(rep, "halves", data_df=6)[1] == pytest.approx(1.5, rel=1e-12)  # 1 / (1/2 + 1/6)
    assert ps.standard_error(rep, "bootstrap", data_df=6)[1] == 3  # the bootstrap keeps B - 1
    with pytest.raises(ConfigError, match="The 'class_counts' parameter of welch_df must be counts >= 1"):
        ps.welch_df([5, 0])


def test_interval_is_estimate_plus_minus_t_quantile_times_se():
    est = np.array([0.5, 0.8])
    rep = np.array([[0.6, 0.9], [0.4, 0.7], [0.55, 0.85], [0.45, 0.75]])  # |T_A - T_B| = 0.2, 0.1 in both layers
    iv = ps.interval(est, rep, level=0.95)
    half = scipy.stats.t.ppf(0.975, 2) * np.sqrt((0.2**2 + 0.1**2) / 2 / 4)
    np.testing.assert_allclose(iv.low, est - half, rtol=1e-12)
    np.testing.assert_allclose(iv.high, est + half, rtol=1e-12)
    assert iv.method == "refit-halves-t" and iv.n_resamples == 4 and not np.any(iv.degenerate)
    wide = ps.interval(est, rep, level=0.95, data_df=5)  # 1/df = 1/2 + 1/5
    np.testing.assert_allclose(wide.high, est + scipy.stats.t.ppf(0.975, 1 / (1 / 2 + 1 / 5)) / scipy.stats.t.ppf(
        0.975, 2) * half, rtol=1e-12)
    flat = ps.interval(est, np.ones((4, 2)))
    assert np.all(flat.degenerate) and flat.low == flat.high == est.tolist()


def stats_of(acc, reps_acc, ctrl=None, reps_ctrl=None, layers=None, scheme="bootstrap"):
    """A ProbeStats with planted estimates and replicates (no fitting)."""
    L = len(acc)
    res = probes.ProbeResult(
        layers=list(range(L)) if layers is None else layers, sample=np.arange(4), y=np.array([0, 0, 1, 1]),
        y_control=np.array([0, 1, 0, 1]), accuracy=np.asarray(acc, float),
        control=None if ctrl is None else np.asarray(ctrl, float),
        selectivity=None if ctrl is None else np.asarray(acc, float) - np.asarray(ctrl, float),
        oof=np.zeros((L, 4), int), oof_control=np.zeros((L, 4), int), metric="balanced_accuracy", n_splits=2,
        seed=0, n_excluded=0, class_counts={0: 2, 1: 2}, params={}, seconds=np.zeros(L))
    reps = {"accuracy": np.asarray(reps_acc, float)}
    if reps_ctrl is not None:
        reps["control"] = np.asarray(reps_ctrl, float)
    return ps.ProbeStats(result=res, replicates=reps, level=0.95, seed=0, scheme=scheme)


def test_compare_conditions_t_test_and_holm_over_every_pair_and_layer():
    B = 5
    noise = np.array([-2, -1, 0, 1, 2])[:, None] * np.array([0.01, 0.02])  # sd = 0.0158 x (1, 2)
    ref = stats_of([0.5, 0.5], 0.5 + noise * 0)
    a = stats_of([0.6, 0.55], 0.5 + noise)
    b = stats_of([0.5, 0.7], 0.5 + noise)
    out = ps.compare_conditions({"a": (a, ref), "b": (b, ref)}, alpha=0.05)
    sd = noise.std(axis=0, ddof=1)
    t = {"a": np.array([0.1, 0.05]) / sd, "b": np.array([0.0, 0.2]) / sd}
    p = {k: 2 * scipy.stats.t.sf(np.abs(v), B - 1) for k, v in t.items()}
    flat = np.concatenate([p["a"], p["b"]])
    order = np.argsort(flat)
    holm = np.maximum.accumulate(np.minimum(1, (4 - np.arange(4)) * flat[order]))
    want = np.empty(4)
    want[order] = holm
    np.testing.assert_allclose(out["a"]["pvalue"] + out["b"]["pvalue"], flat, rtol=1e-12)
    np.testing.assert_allclose(out["a"]["p_adjusted"] + out["b"]["p_adjusted"], want, rtol=1e-12)
    assert out["a"]["n_tests"] == 4 and out["a"]["family"] == "2 comparisons x layers = 4 tests"
    assert out["a"]["survivors"] == [layer for layer in (0, 1) if want[layer] <= 0.05]
    assert out["b"]["pvalue"][0] == 1.0  # zero difference


def test_t_pvalue_zero_se():
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.array([0.1, 0.0]) / np.array([0.0, 0.0])
    np.testing.assert_array_equal(ps.t_pvalue(t, 5), [0.0, 1.0])


def test_decodes_from_bonferroni_over_conditions_and_fixed_sequence_from_the_deepest_layer():
    B = 5
    z = np.array([-2, -1, 0, 1, 2], float)[:, None]  # sd 1.58 x the per-layer step
    sd = 0.05
    step = sd / z.std(ddof=1)
    # selectivity replicates: accuracy replicates vary, control replicates fixed -> SE = sd in every layer
    q1, q2 = scipy.stats.t.ppf(1 - 0.05 / 2, B - 1), scipy.stats.t.ppf(1 - 0.05, B - 1)
    sel = np.array([0.3, -0.1, 0.3, (q1 + q2) / 2 * sd, 0.3])  # layer 3 passes alone, not with Bonferroni over 2
    one = stats_of(0.25 + sel, 0.25 + sel + step * z, [0.25] * 5, np.full((B, 5), 0.25))
    none = stats_of([0.25] * 5, 0.25 + step * z, [0.25] * 5, np.full((B, 5), 0.25))
    np.testing.assert_allclose(one.se("selectivity"), sd, rtol=1e-12)
    assert ps.decodes_from({"c": one}, alpha=0.05) == {"c": 2}  # layers 2, 3, 4 pass; layer 1 stops the sequence
    assert ps.decodes_from({"c": one, "d": none}, alpha=0.05) == {"c": 4, "d": None}
    assert ps.first_of_run([True, False, True, True], [0, 6, 12, 18]) == 12


def test_probe_stats_pairs_conditions_through_one_design_and_checks_it():
    X, y = data(n=40, layers=2)
    res = probes.probe_layers(X, y, seed=0)
    d = ps.make_design(res.y, res.y_control, n_refits=3, seed=0)
    one = ps.probe_stats(X, y, design=d, fit_predict=sim.centroid_fit_predict)
    two = ps.probe_stats(X[:, ::-1], y, design=d, fit_predict=sim.centroid_fit_predict)
    assert one.replicates["accuracy"].shape == (6, 2)
    assert one.data_df == 38 and one.df == pytest.approx(1 / (1 / 3 + 1 / 38), rel=1e-12)  # 20 + 20 samples
    half = np.subtract(one.ci().high, one.ci().low) / 2
    np.testing.assert_allclose(half, scipy.stats.t.ppf(0.975, 1 / (1 / 3 + 1 / 38)) * one.se(), rtol=1e-12)
    out = ps.compare_conditions({"flipped": (two, one)})
    assert len(out["flipped"]["pvalue"]) == 2
    other = ps.make_design(np.roll(res.y, 1), res.y_control, n_refits=3, seed=0)
    with pytest.raises(DataError, match="must be made for these labels"):
        ps.probe_stats(X, y, design=other)
    with pytest.raises(ConfigError, match="n_refits"):
        ps.make_design(y, n_refits=1)


# --------------------------------------------------------------------------- simulated coverage (slow)
# The fast nearest-centroid learner (probe_sim.centroid_fit_predict) stands in for the logistic probe:
# the resampling scheme, not the learner, is under test, and its OOF predictions depend on each other
# across folds in the same way.  benchmarks/bench_probe_coverage.py runs more replications, the old
# intervals beside the new, and the logistic probe.

REPS = 60


def binomial_band(p, n, z=3.29):
    """p +- z sqrt(p (1-p) / n) (z = 3.29: two-sided 99.9%)."""
    half = z * np.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.fixture(scope="module")
def coverage_runs():
    runs = {}
    for n in (48, 100, 200):
        for k in (2, 4):
            for signal in (0.0, 1.0):
                runs[(n, k, signal)] = sim.coverage(n, k, signal, REPS, fit_predict=sim.centroid_fit_predict,
                                                    seed=1000 * n + 10 * k + int(signal), old=False)
    return runs


@pytest.mark.slow
def test_two_class_intervals_cover_95_percent_at_chance_and_with_a_signal(coverage_runs):
    pooled = []
    for (n, k, signal), r in coverage_runs.items():
        if k != 2:
            continue
        for which in ("accuracy", "selectivity"):
            c = r[f"new_{which}"]
            low, high = binomial_band(0.95, len(c))
            assert low <= c.mean() <= high, (n, signal, which, c.mean())
            pooled.append(c)
    pooled = np.concatenate(pooled)  # 2 x 6 x REPS intervals
    assert abs(pooled.mean() - 0.95) <= 0.02, pooled.mean()


@pytest.mark.slow
def test_four_imbalanced_classes_cover_95_percent_at_every_n(coverage_runs):
    """4 classes 0.4/0.25/0.2/0.15: at n = 48 and 100 a half holds 3-7 samples of the smallest class; with
    df = R alone the small cells covered 0.930-0.940 (3000 replications a cell), with 1/df = 1/R + 1/nu
    (nu = Welch df of the class counts: 26 at n = 48) 0.940-0.957 (bench_probe_coverage.py)."""
    for signal in (0.0, 1.0):
        for which in ("accuracy", "selectivity"):
            c = coverage_runs[(200, 4, signal)][f"new_{which}"]
            low, high = binomial_band(0.95, len(c))
            assert low <= c.mean() <= high, (signal, which, c.mean())
    small = np.concatenate([coverage_runs[(n, 4, s)][f"new_{w}"] for n in (48, 100) for s in (0.0, 1.0)
                            for w in ("accuracy", "selectivity")])
    low, high = binomial_band(0.95, len(small))  # 8 x REPS intervals: 0.95 +- 0.033
    assert low <= small.mean() <= high, small.mean()


@pytest.mark.slow
def test_condition_comparisons_and_from_layer_claims_keep_the_familywise_error_under_the_global_null():
    """25 layers, an original and 3 other conditions whose states all come from one distribution (chance):
    a false 'condition - original' layer or a false 'from layer X' anywhere is one family-wise error.
    Measured with df = R alone: 0.077 +- 0.015 and 0.057 +- 0.013 (300 replications; the 0.15 / 0.10 once seen in
    40 was mostly noise); with the Welch df (1/df = 1/10 + 1/46 at 24 + 24) these seeds make 12 and 15 errors in
    200 (0.06, 0.075; 3 and 3 in the first 40, 6 and 4 with df = R), the benchmark 0.032 and 0.034 in 500.  The
    bound (19 of 200 = 0.05 + 3.09 binomial SE) fails a true FWER of 0.05 with probability ~0.001 and catches
    a gross failure (the old rules' 0.53 / 0.27), not a shortfall of 0.02-0.03."""
    reps, hits_cmp, hits_from = 200, 0, 0
    for r in range(reps):
        rng = np.random.default_rng(5000 + r)
        y = rng.permutation(np.repeat([0, 1], 24))
        Xs = {c: rng.standard_normal((48, 25, 8)) for c in ("original", "a", "b", "c")}
        res = ps.cross_validate(Xs["original"], y, seed=r, fit_predict=sim.centroid_fit_predict)
        design = ps.make_design(res.y, res.y_control, seed=r)
        st = {c: ps.probe_stats(X, y, seed=r, design=design, fit_predict=sim.centroid_fit_predict)
              for c, X in Xs.items()}
        cmp = ps.compare_conditions({c: (s, st["original"]) for c, s in st.items() if c != "original"})
        hits_cmp += any(v["survivors"] for v in cmp.values())
        hits_from += any(v is not None for v in ps.decodes_from(st).values())
    assert hits_cmp <= 19 and hits_from <= 19, (hits_cmp, hits_from)
