"""Bootstrap CIs over samples, paired tests and multiplicity control (gapcache.analyze.stats)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import xarray as xr

from gapcache.analyze import stats
from gapcache.errors import ConfigError, DataError

MU = 0.3  # true paired mean difference of the simulations


def binomial_tol(p=0.95, reps=300, z=3.5):
    """Half-width of a z-sigma band around the nominal coverage for `reps` independent intervals."""
    return z * np.sqrt(p * (1 - p) / reps)  # 300 reps: 0.044 (about +/- 4 points)


def simulate_paired(rng, n=40, reps=300, mu=MU, shared=1.0):
    """a = mu + u_i + e, b = u_i + e': a per-sample effect u_i (sd `shared`) common to both conditions."""
    u = rng.normal(scale=shared, size=(n, reps))
    return mu + u + rng.normal(size=(n, reps)), u + rng.normal(size=(n, reps))


def da(values, ids, layers=None):
    dims = ("sample",) if values.ndim == 1 else ("sample", "layer")
    coords = {"sample": ids}
    if values.ndim == 2:
        coords["layer"] = layers if layers is not None else list(range(values.shape[1]))
    return xr.DataArray(values, dims=dims, coords=coords)


# --------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("method", ["percentile", "BCa", "basic"])
def test_constant_difference_gives_zero_width_interval(method):
    b = np.random.default_rng(0).normal(size=30)
    ci = stats.mean_diff_ci(b + 0.5, b - 0.0, method=method, n_resamples=500, seed=3)
    assert ci.estimate == pytest.approx(0.5, abs=1e-12)
    assert ci.low == ci.estimate == ci.high
    exact = stats.mean_diff_ci(np.full(30, 0.5), np.zeros(30), method=method)
    assert (exact.estimate, exact.low, exact.high) == (0.5, 0.5, 0.5)


def test_recorded_fields_and_json():
    ci = stats.mean_ci(np.arange(10.0), level=0.9, method="percentile", n_resamples=123, seed=7)
    d = json.loads(json.dumps(ci.to_dict()))
    assert d["statistic"] == "mean" and d["estimate"] == 4.5
    assert (d["n"], d["level"], d["method"], d["n_resamples"], d["seed"]) == (10, 0.9, "percentile", 123, 7)
    assert d["paired"] is False and d["dims"] == [] and d["n_dropped"] == 0
    assert d["low"] < 4.5 < d["high"]
    assert stats.mean_ci(np.arange(10.0), method="bca").method == "BCa"


def test_matches_scipy_bootstrap_with_same_seed():
    x = np.random.default_rng(1).normal(size=50)
    ci = stats.mean_ci(x, method="BCa", n_resamples=999, seed=11)
    ref = scipy.stats.bootstrap((x,), np.mean, method="BCa", n_resamples=999, rng=np.random.default_rng(11))
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)


def _scipy_interval(arrays, statistic, paired, method, n_resamples, seed):
    res = scipy.stats.bootstrap(tuple(arrays), statistic, paired=paired, vectorized=True, axis=0, method=method,
                                n_resamples=n_resamples, batch=stats._batch(arrays, n_resamples),
                                rng=np.random.default_rng(seed))
    return np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


@pytest.mark.parametrize("method", ["percentile", "basic"])
@pytest.mark.parametrize("shape", [(7,), (192,), (60, 5), (30, 3, 2), (1500, 40)])  # the last: 16 batches
def test_mean_intervals_draw_scipys_resamples(method, shape):
    """The matrix-product path of means and paired differences gives scipy's interval: to rounding on
    normal data, exactly on 0/1 data (its resample sums are integers)."""
    rng = np.random.default_rng(4)
    normal = rng.normal(size=shape), rng.normal(size=shape)
    binary = (rng.random(shape) < 0.7).astype(float), (rng.random(shape) < 0.4).astype(float)
    for (a, b), tol in ((normal, 1e-12), (binary, 0.0)):
        for got, want in (
            (stats.mean_ci(a, method=method, n_resamples=499, seed=3),
             _scipy_interval([a], lambda x, axis: np.mean(x, axis=axis), False, method, 499, 3)),
            (stats.mean_diff_ci(a, b, method=method, n_resamples=499, seed=3),
             _scipy_interval([a, b], lambda x, y, axis: np.mean(x - y, axis=axis), True, method, 499, 3)),
        ):
            assert np.abs(np.asarray(got.low) - want[0]).max() <= tol
            assert np.abs(np.asarray(got.high) - want[1]).max() <= tol


def test_shared_draws_are_cached_per_seed_and_size_and_constant_columns_stay_degenerate():
    stats._COUNTS_CACHE.clear()
    x = np.random.default_rng(5).normal(size=(40, 3))
    x[:, 1] = 0.1  # constant: its resample sums could differ in the last bit; still zero width
    one = stats.mean_ci(x, seed=2)
    assert len(stats._COUNTS_CACHE) == 1
    assert stats.mean_ci(x[:, 0], seed=2).low == pytest.approx(one.low[0], abs=1e-15)
    assert len(stats._COUNTS_CACHE) == 1  # same (seed, n, B, batch): the draw is reused
    stats.mean_ci(x[:30], seed=2), stats.mean_ci(x, seed=3)
    assert len(stats._COUNTS_CACHE) == 3
    assert one.degenerate.tolist() == [False, True, False] and one.low[1] == one.high[1] == one.estimate[1]
    free = [stats.mean_ci(x[:, 0], seed=None).low for _ in range(2)]  # no seed: fresh draws, not cached
    assert free[0] != free[1] and len(stats._COUNTS_CACHE) == 3


def test_same_seed_same_interval_other_seed_differs():
    x = np.random.default_rng(2).normal(size=40)
    one, two = (stats.mean_ci(x, seed=5) for _ in range(2))
    assert (one.low, one.high) == (two.low, two.high)
    assert stats.mean_ci(x, seed=6).low != one.low


def test_vectorized_over_layers_matches_column_by_column():
    x = np.random.default_rng(3).normal(size=(60, 5))
    many = stats.mean_ci(x, method="percentile", n_resamples=400, seed=0)
    assert many.low.shape == (5,)
    for j in range(5):
        one = stats.mean_ci(x[:, j], method="percentile", n_resamples=400, seed=0)
        assert (many.low[j], many.high[j]) == pytest.approx((one.low, one.high), rel=1e-12)


def test_dataarray_layer_dim_and_xarray_roundtrip():
    x = np.random.default_rng(4).normal(size=(20, 3))
    ci = stats.mean_ci(da(x, [f"s{i}" for i in range(20)], layers=[4, 8, 12]).transpose("layer", "sample"))
    assert ci.dims == ("layer",) and ci.coords == {"layer": [4, 8, 12]}
    ds = ci.to_xarray()
    assert list(ds.layer.values) == [4, 8, 12] and ds.attrs["method"] == stats.DEFAULT_METHOD == "percentile"
    np.testing.assert_allclose(ds.estimate.values, x.mean(axis=0))


def test_one_default_method_everywhere():
    """Every CI function (stats, probes, evd gap) and the pipeline share stats.DEFAULT_METHOD."""
    import inspect

    from gapcache.analyze import evd, probes
    from gapcache.analyze.pipeline import AnalysisParams

    fns = [stats.bootstrap_ci, stats.mean_ci, stats.paired_ci, stats.mean_diff_ci, stats.compare_paired,
           probes.probe_accuracy_ci, evd.evd_gap]
    for fn in fns:
        assert inspect.signature(fn).parameters["method"].default == stats.DEFAULT_METHOD, fn.__name__
    assert AnalysisParams().ci_method == stats.DEFAULT_METHOD
    assert stats.mean_ci(np.arange(10.0)).method == "percentile"


def test_degenerate_intervals_are_flagged():
    ones = stats.mean_ci(np.ones(20))
    assert (ones.low, ones.high) == (1.0, 1.0) and ones.degenerate is True and "zero width" in ones.note
    assert ones.to_dict()["degenerate"] is True
    fine = stats.mean_ci(np.arange(20.0))
    assert fine.degenerate is False and fine.note == ""
    x = np.random.default_rng(0).normal(size=(20, 3))
    x[:, 1] = 0.9  # one layer constant
    per_layer = stats.mean_ci(x)
    assert per_layer.degenerate.tolist() == [False, True, False]
    assert per_layer.to_dict()["degenerate"] == [False, True, False]
    labelled = stats.mean_ci(da(x, [f"s{i}" for i in range(20)], layers=[4, 8, 12]))
    assert labelled.to_xarray().degenerate.values.tolist() == [False, True, False]
    assert stats.mean_diff_ci(np.full(30, 0.5), np.zeros(30)).degenerate is True
    bern = (np.random.default_rng(1).random(20) < 0.9).astype(float)
    bern[:] = 1.0  # Bernoulli(0.9) at n = 20 draws no failure 12% of the time
    assert stats.mean_ci(bern).degenerate is True


def test_generic_paired_statistic():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=40), rng.normal(size=40)
    ci = stats.paired_ci(a, b, lambda a, b, axis: np.median(a - b, axis=axis), method="percentile", name="median_diff")
    assert ci.statistic == "median_diff" and ci.paired
    assert ci.estimate == pytest.approx(np.median(a - b))
    assert ci.low <= ci.estimate <= ci.high


def test_paired_bootstrap_narrower_than_unpaired_with_shared_sample_effect():
    a, b = simulate_paired(np.random.default_rng(6), n=60, reps=1, shared=3.0)  # width ratio ~ sqrt(2/20)
    paired = stats.mean_diff_ci(a[:, 0], b[:, 0], seed=0)
    unpaired = stats.bootstrap_ci((a[:, 0], b[:, 0]), lambda a, b, axis: a.mean(axis) - b.mean(axis), paired=False)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.width < 0.5 * unpaired.width


# --------------------------------------------------------------------------- alignment


def test_align_samples_inner_join_counts_dropped_and_pairs_by_id():
    a = da(np.arange(6.0), ["s0", "s1", "s2", "s3", "s4", "s5"])
    b = da(np.array([13.0, 11.0, 10.0, 99.0]), ["s3", "s1", "s0", "x9"])
    al = stats.align_samples(a, b)
    assert (al.dropped_a, al.dropped_b) == (3, 1)
    assert list(al.a.sample.values) == ["s0", "s1", "s3"] == list(al.b.sample.values)
    np.testing.assert_array_equal(al.b.values - al.a.values, [10.0, 10.0, 10.0])
    ci = stats.mean_diff_ci(b, a)  # DataArrays: aligned automatically, pairs by id not by position
    assert (ci.estimate, ci.low, ci.high, ci.n, ci.n_dropped) == (10.0, 10.0, 10.0, 3, 4)


def test_align_refuses_duplicates_and_disjoint_ids():
    with pytest.raises(DataError, match="unique sample ids"):
        stats.align_samples(da(np.zeros(2), ["s0", "s0"]), da(np.zeros(1), ["s0"]))
    with pytest.raises(DataError, match="share no sample id"):
        stats.align_samples(da(np.zeros(2), ["a", "b"]), da(np.zeros(2), ["c", "d"]))


def test_bootstrap_ci_refuses_misaligned_dataarrays():
    a, b = da(np.zeros(3), ["s0", "s1", "s2"]), da(np.zeros(3), ["s2", "s1", "s0"])
    with pytest.raises(DataError, match="align_samples"):
        stats.bootstrap_ci((a, b), lambda a, b, axis: np.mean(a - b, axis=axis))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="studentized"), "The 'method' parameter of bootstrap_ci must be one of"),
        (dict(level=95), r"The 'level' parameter of bootstrap_ci must be a float in \(0, 1\). Got 95"),
        (dict(n_resamples=0), "The 'n_resamples' parameter of bootstrap_ci must be an int >= 1. Got 0"),
    ],
)
def test_parameter_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        stats.bootstrap_ci(np.arange(5.0), lambda x, axis: x.mean(axis), **kwargs)


def test_statistic_must_be_vectorized():
    with pytest.raises(ConfigError, match="must accept an 'axis' keyword"):
        stats.bootstrap_ci(np.arange(5.0), lambda x: x.mean())


def test_data_errors():
    with pytest.raises(DataError, match="Got 1 of 4 samples with NaN"):
        stats.mean_ci(np.array([1.0, np.nan, 2.0, 3.0]))
    with pytest.raises(DataError, match="same shape"):
        stats.mean_diff_ci(np.zeros(4), np.zeros(5))
    with pytest.raises(DataError, match="both be DataArrays"):
        stats.mean_diff_ci(da(np.zeros(3), ["a", "b", "c"]), np.zeros(3))
    with pytest.raises(DataError, match="at least 2 samples"):
        stats.mean_ci(np.zeros(1))


# --------------------------------------------------------------------------- p-values and corrections


def test_holm_and_bh_exact_values():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(stats.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(stats.adjust_pvalues(p, "none"), p)
    np.testing.assert_allclose(stats.adjust_pvalues([0.5, 0.9, 0.01], "holm"), [1.0, 1.0, 0.03])
    with pytest.raises(ConfigError, match="The 'method' parameter of adjust_pvalues"):
        stats.adjust_pvalues(p, "bonferroni-ish")
    with pytest.raises(DataError):
        stats.adjust_pvalues([0.1, 1.5])


def test_signflip_exact_matches_scipy_permutation_test():
    d = np.random.default_rng(8).normal(0.4, 1, size=(12, 3))
    ours = stats.paired_pvalues(d, np.zeros_like(d), test="signflip", n_resamples=9999)  # 2**12 < 9999: exact
    ref = scipy.stats.permutation_test((d,), lambda x, axis: x.mean(axis=axis), permutation_type="samples", axis=0)
    np.testing.assert_allclose(ours, ref.pvalue)


def test_pvalues_zero_difference_is_one_and_bootstrap_formula():
    assert stats.paired_pvalues(np.ones(20), np.ones(20)) == 1.0
    assert stats.paired_pvalues(np.ones(20), np.ones(20), test="bootstrap") == 1.0
    assert stats.bootstrap_pvalue(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(2 * 2 / 5)
    assert stats.bootstrap_pvalue(np.ones(99)) == pytest.approx(2 / 100)


def test_compare_paired_survivors_holm_and_bh():
    rng = np.random.default_rng(9)
    n, shift = 80, np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    u = rng.normal(size=(n, 1))
    a = da(u + shift + rng.normal(scale=0.5, size=(n, 6)), [f"s{i}" for i in range(n)], layers=[0, 4, 8, 12, 16, 20])
    b = da(u + rng.normal(scale=0.5, size=(n, 6)), [f"s{i}" for i in range(n)], layers=[0, 4, 8, 12, 16, 20])
    for correction in ("holm", "bh"):
        cmp = stats.compare_paired(a, b, correction=correction, alpha=0.05, n_resamples=999)
        assert cmp.survivors == [12, 16]
        assert cmp.correction == correction and cmp.test == "signflip" and cmp.n_tests == 6
        assert np.all(cmp.p_adjusted >= cmp.pvalue)
        d = json.loads(json.dumps(cmp.to_dict()))
        assert d["survivors"] == [12, 16] and d["interval"]["coords"] == {"layer": [0, 4, 8, 12, 16, 20]}
    boot = stats.compare_paired(a, b, test="bootstrap", n_resamples=999)
    assert boot.survivors == [12, 16] and boot.test == "bootstrap"


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_paired_mean_difference_ci_covers_at_nominal_rate(method):
    """300 simulated paired datasets (n=40, known mean difference 0.3), one vectorized call."""
    a, b = simulate_paired(np.random.default_rng(10), n=40, reps=300)
    ci = stats.mean_diff_ci(a, b, method=method, n_resamples=1999, seed=0)
    coverage = ci.contains(MU).mean()
    assert abs(coverage - 0.95) <= binomial_tol(reps=300), coverage


def test_bootstrapping_layers_undercovers_the_sample_level_effect():
    """The seed work's mistake: average each layer over samples, then bootstrap over the layer axis.

    d[i, l] = mu + u_i + e_il, with a per-sample random effect u_i shared by all 24 layers.  The
    quantity of interest is the population mean effect mu; a layer bootstrap treats the 24 layer
    means as independent draws and ignores the variability of u_i (1/sqrt(n) of it), so its intervals
    are far too narrow.  Resampling samples (of the per-sample layer average) covers at ~95%.
    """
    rng = np.random.default_rng(11)
    n, layers, reps = 40, 24, 300
    d = MU + rng.normal(size=(n, 1, reps)) + rng.normal(size=(n, layers, reps))
    over_samples = stats.mean_ci(d.mean(axis=1), method="percentile", n_resamples=999).contains(MU).mean()
    over_layers = stats.mean_ci(d.mean(axis=0), method="percentile", n_resamples=999).contains(MU).mean()
    assert abs(over_samples - 0.95) <= binomial_tol(reps=reps), over_samples
    assert over_layers < 0.6, over_layers


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_coverage_one_call_per_dataset(method):
    """500 separate calls (own seed each, the path a user takes per comparison); +/- 3.5 sigma."""
    a, b = simulate_paired(np.random.default_rng(12), n=40, reps=500)
    hits = [stats.mean_diff_ci(a[:, j], b[:, j], method=method, n_resamples=999, seed=j).contains(MU)
            for j in range(500)]
    assert abs(np.mean(hits) - 0.95) <= binomial_tol(reps=500), np.mean(hits)


def test_signflip_holm_controls_familywise_error():
    """Under H0 at every one of 10 layers, Holm at alpha 0.05 rejects anything in <= ~5% of 200 runs."""
    rng = np.random.default_rng(13)
    d = rng.normal(size=(200, 30, 10))  # (runs, samples, layers)
    any_reject = [stats.adjust_pvalues(stats.signflip_pvalue(x, n_resamples=499, seed=i), "holm").min() <= 0.05
                  for i, x in enumerate(d)]
    assert np.mean(any_reject) <= 0.05 + binomial_tol(p=0.05, reps=200)


def test_analysis_tier_does_not_import_torch():
    code = "import sys, gapcache.analyze.stats, gapcache.analyze.probes; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["percentile", "basic", "bca"])
def test_column_cis_give_each_columns_own_interval(method):
    """column_cis resamples the columns sharing a mask together; each column's interval is its own mean_ci /
    mean_diff_ci on its finite rows (to the last bits of the bootstrap means), None below two rows."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    a[[2, 9], 1] = np.nan  # column 1: its own mask
    b[5, 4] = np.nan  # column 4 (paired only): its own mask
    a[1:, 5] = np.nan  # column 5: one row left
    kw = dict(method=method, n_resamples=199, seed=7)
    for pair in (False, True):
        got = stats.column_cis(a, b if pair else None, **kw)
        for j in range(6):
            ok = np.isfinite(a[:, j]) & (np.isfinite(b[:, j]) if pair else True)
            assert got["n"][j] == int(ok.sum())
            if ok.sum() < 2:
                assert got["estimate"][j] is got["low"][j] is got["high"][j] is None
                continue
            ci = stats.mean_diff_ci(a[ok, j], b[ok, j], **kw) if pair else stats.mean_ci(a[ok, j], **kw)
            for key in ("estimate", "low", "high"):
                assert got[key][j] == pytest.approx(getattr(ci, key), rel=1e-12, abs=1e-15), (pair, j, key)


def test_column_cis_refuses_arrays_of_other_shapes():
    with pytest.raises(DataError, match="'a' \\(and 'b'\\) parameters of column_cis must be \\(sample, column\\)"):
        stats.column_cis(np.zeros((5, 2)), np.zeros((5, 3)))
