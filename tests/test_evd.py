"""Planted Delta curves give the exact EVD, area, tau, cliff and gap; truncation curves from store-shaped data."""

import numpy as np
import pytest
import xarray as xr

from gapcache.analyze.evd import (
    adaptive_tau, cliff, delta, evd, evd_area, evd_gap, evd_gap_by_group, first_crossing, fixed_tau,
    steepest_decline, truncation_curves, truncation_deltas,
)
from gapcache.errors import ConfigError, DataError

LAYERS = np.array([-1, 0, 2, 4, 6, 8])
# sample 0 crosses 1.0 last at layer 4; sample 1 last at 2; sample 2 never; sample 3 non-monotone: last at 8
D = np.array([
    [5.0, 4.0, 3.0, 1.0, 0.5, 0.0],
    [3.0, 2.0, 1.5, 0.2, 0.1, 0.0],
    [0.9, 0.5, 0.2, 0.1, 0.0, 0.0],
    [2.0, 0.0, 0.0, 0.0, 0.0, 1.2],
])


def test_delta_is_clean_minus_intervened():
    np.testing.assert_array_equal(delta([-1.0, -2.0], [[-3.0, -2.5]]), [[2.0, 0.5]])


def test_evd_exact_with_nan_when_never_reached():
    np.testing.assert_array_equal(evd(D, LAYERS, 1.0), [4.0, 2.0, np.nan, 8.0])
    np.testing.assert_array_equal(evd(D, LAYERS, 0.0), [8.0, 8.0, 8.0, 8.0])  # >= tau, inclusive


def test_area_form():
    np.testing.assert_allclose(evd_area(D, LAYERS, 1.0), [4 + 3 + 2, 2 + 1 + 0.5, 0.0, 1.0 + 0.2])


def test_fixed_and_adaptive_tau():
    assert fixed_tau(0.3).as_attrs() == {"tau_value": 0.3, "tau_rule": "fixed", "tau_pilot": [], "tau_pilot_curve": []}
    t = adaptive_tau(D, tau_ratio=0.5)  # all samples: mean curve max = (5+3+0.9+2)/4 = 2.725
    assert t.value == pytest.approx(0.5 * 2.725) and t.pilot == (0, 1, 2, 3) and t.rule == "adaptive"
    p = adaptive_tau(D, tau_ratio=0.5, n_pilot=2, seed=7)
    want = tuple(sorted(np.random.default_rng(7).choice(4, size=2, replace=False).tolist()))
    assert p.pilot == want and p.seed == 7
    assert p.value == pytest.approx(0.5 * D[list(want)].mean(axis=0).max())
    assert adaptive_tau(D, 0.5, n_pilot=2, seed=7) == p  # seeded: reproducible
    with pytest.raises(ConfigError, match="The 'tau_ratio' parameter of adaptive_tau must be in"):
        adaptive_tau(D, 1.5)
    with pytest.raises(ConfigError, match="'n_pilot'"):
        adaptive_tau(D, 0.5, n_pilot=9)


def test_cliff_three_methods_on_planted_curves():
    layers = np.array([0, 1, 2, 3, 4, 5])
    d = np.array([[4.0, 4.0, 3.8, 0.6, 0.2, 0.0],
                  [4.0, 3.6, 3.4, 1.0, 0.4, 0.0],
                  [4.0, 4.0, 4.0, 4.0, 0.0, 0.0]])
    # mean curve: [4, 3.8667, 3.7333, 1.8667, 0.2, 0]; steps: -.133, -.133, -1.867, -1.667, -.2
    s = cliff(d, layers, method="steepest")
    assert (s.layer, s.method, s.tau) == (2.0, "steepest", None)  # last layer before the drop 2 -> 3
    f = cliff(d, layers, tau=2.0, method="first_crossing")
    assert (f.layer, f.method, f.tau) == (3.0, "first_crossing", 2.0)  # first layer below tau
    m = cliff(d, layers, tau=2.0, method="median_evd")  # EVDs 2, 2, 3 -> median 2
    assert (m.layer, m.method) == (2.0, "median_evd")
    assert cliff(d[:2], layers, tau=2.0, method="median_evd").layer == 2.0
    assert cliff(d[[0, 2]], layers, tau=2.0, method="median_evd").layer == 2.5  # between grid layers
    assert m.as_attrs()["cliff_method"] == "median_evd" and m.n_samples == 3
    np.testing.assert_allclose(m.mean_curve, d.mean(axis=0))


def test_crossing_and_steepest_edge_cases():
    layers = np.arange(4)
    assert np.isnan(first_crossing([0.1, 0.2, 0.1, 0.0], layers, 1.0))  # never reaches tau
    assert np.isnan(first_crossing([2.0, 2.0, 1.5, 1.2], layers, 1.0))  # never falls below
    assert first_crossing([0.5, 2.0, 0.5, 0.0], layers, 1.0) == 2.0  # must have been above first
    assert steepest_decline([1.0, 0.0, 1.0, 0.0], layers) == 0.0  # ties: the first
    with pytest.raises(ConfigError, match="'tau' parameter of cliff"):
        cliff(D, LAYERS, method="first_crossing")
    with pytest.raises(ConfigError, match="must be one of"):
        cliff(D, LAYERS, 1.0, method="knee")
    with pytest.raises(ConfigError, match="strictly increasing"):
        evd(D, LAYERS[::-1], 1.0)


def test_evd_gap_exact_and_by_group():
    e = evd(D, LAYERS, 1.0)  # [4, 2, nan, 8]
    g = evd_gap_by_group(e, np.array(["hard", "easy", "easy", "hard"]), never_reached="skip")
    assert (g.gap, g.mean_a, g.mean_b, g.n_a, g.n_b, g.n_missing_b) == (4.0, 6.0, 2.0, 2, 1, 1)
    two_models = evd_gap([10.0, 12.0], [4.0, 4.0, 7.0], "30B", "7B")
    assert two_models.gap == pytest.approx(6.0) and two_models.label_a == "30B"
    with pytest.raises(DataError, match="at least one finite EVD"):
        evd_gap([np.nan], [1.0], never_reached="skip")


def test_evd_gap_never_reached_rules_on_a_planted_case():
    """One function, three rules; the default (below_grid, = the pipeline's) needs the grid."""
    e = evd(D, LAYERS, 1.0)  # [4, 2, nan, 8]; hard = {0, 3}, easy = {1, 2}
    groups = np.array(["hard", "easy", "easy", "hard"])
    below = evd_gap_by_group(e, groups, layers=LAYERS)  # never reached = min(LAYERS) - 1 = -2
    assert (below.gap, below.mean_b, below.never_reached, below.never_reached_as) == (6.0, 0.0, "below_grid", -2.0)
    assert (below.n_used_a, below.n_used_b, below.n_missing_b) == (2, 2, 1)
    seed = evd_gap_by_group(e, groups, never_reached=0.0)  # the seed's EVD = 0
    assert (seed.gap, seed.mean_b, seed.never_reached_as) == (5.0, 1.0, 0.0)
    np.testing.assert_array_equal(evd(D, LAYERS, 1.0, never_reached=0.0), [4.0, 2.0, 0.0, 8.0])
    with pytest.raises(ConfigError, match="The 'layers' parameter of evd_gap must give the truncation grid"):
        evd_gap_by_group(e, groups)
    with pytest.raises(ConfigError, match="The 'never_reached' parameter of evd_gap must be one of"):
        evd_gap(e, e, never_reached="drop")


def test_evd_gap_ci_from_arrays_unpaired_and_paired():
    from gapcache.analyze import stats

    rng = np.random.default_rng(0)
    hard, easy = rng.normal(5, 1, 40), rng.normal(3, 1, 30)
    hard[:3] = np.nan
    g = evd_gap(hard, easy, "hard", "easy", layers=np.arange(-1, 8), n_resamples=999)
    filled = np.where(np.isnan(hard), -2.0, hard)
    want = stats.bootstrap_ci((filled, easy), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=False,
                              n_resamples=999, seed=0)
    assert (g.gap, g.low, g.high) == pytest.approx((want.estimate, want.low, want.high), rel=1e-12)
    d = g.to_dict()
    assert d["statistic"] == "evd_gap_hard_minus_easy" and d["method"] == stats.DEFAULT_METHOD
    assert d["never_reached"] == "below_grid" and d["n"] == 37 + 3 and d["degenerate"] is False
    b = hard + 1.0
    pg = evd_gap(b, hard, paired=True, never_reached="skip")  # the same samples in two stores
    assert pg.gap == pytest.approx(1.0) and pg.interval.paired and pg.interval.degenerate  # constant shift
    assert pg.n_used_a == pg.n_used_b == 37
    assert evd_gap(hard, easy, layers=[0, 1], ci=False).interval is None


def test_seed_cliff_rules_on_planted_curves():
    """seed_median: int(np.median) over all samples with never-reached = 0; seed_crossing: first m < tau,
    the last layer if none (gapcache's first_crossing needs the curve above tau first, NaN if it never falls)."""
    assert cliff(D, LAYERS, 1.0, "seed_median").layer == 3.0  # int(median([4, 2, 0, 8])) = int(3.0)
    assert cliff(D, LAYERS, 1.0, "median_evd").layer == 4.0  # median of [4, 2, 8]
    assert cliff(D[[0, 2]], LAYERS, 1.0, "seed_median").layer == 2.0  # int(median([4, 0])) = 2
    assert cliff(D[[0, 1]], LAYERS, 1.0, "seed_median").layer == 3.0  # int(3.0)
    assert cliff(D[[0, 3]], LAYERS, 1.0, "seed_median").layer == 6.0  # int(median([4, 8])) = 6
    layers = np.arange(4)
    rising = np.array([[0.5, 2.0, 0.5, 0.0]])
    assert cliff(rising, layers, 1.0, "seed_crossing").layer == 0.0
    assert cliff(rising, layers, 1.0, "first_crossing").layer == 2.0
    high = np.array([[2.0, 2.0, 1.5, 1.2]])
    assert cliff(high, layers, 1.0, "seed_crossing").layer == 3.0  # never below: the last layer
    assert np.isnan(cliff(high, layers, 1.0, "first_crossing").layer)
    with pytest.raises(ConfigError, match="'tau' parameter of cliff"):
        cliff(D, LAYERS, method="seed_crossing")


def test_seed_tau_rule_and_floor():
    from gapcache.analyze.evd import seed_tau

    cats = np.array(["hard", "easy", "hard", "hard"])
    t = seed_tau(D, cats, tau_ratio=0.1, n_pilot=2)  # first two hard: 0, 2; layer-0 Delta 5.0, 0.9
    assert t.value == pytest.approx(0.1 * (5.0 + 0.9) / 2) and t.pilot == (0, 2) and t.rule == "seed"
    assert seed_tau(D, cats, 0.1).pilot == (0, 2, 3)  # fewer than 5 hard samples: all of them
    with pytest.warns(RuntimeWarning, match="below the floor"):
        neg = seed_tau(-D, cats, 0.1)
    assert neg.value == 1e-6 and neg.floored and neg.raw_value < 0 and "floor" in neg.note
    with pytest.raises(DataError, match="no sample has category 'hard'"):
        seed_tau(D, np.array(["easy"] * 4))


def test_non_positive_adaptive_tau_is_refused_or_floored():
    with pytest.raises(DataError, match="tau = -.* is not positive"):
        adaptive_tau(-D, tau_ratio=0.5)
    with pytest.warns(RuntimeWarning, match="below the floor"):
        t = adaptive_tau(-D, tau_ratio=0.5, floor=1e-6)
    assert t.value == 1e-6 and t.floored is True and t.raw_value == pytest.approx(0.5 * -0.15)
    assert "every layer reached" in t.note and t.as_attrs()["tau_floored"] is True
    ok = adaptive_tau(D, tau_ratio=0.5, floor=1e-6)
    assert ok.value == pytest.approx(0.5 * 2.725) and ok.floored is False and ok.note is None
    with pytest.raises(ConfigError, match="The 'floor' parameter of adaptive_tau must be a positive number"):
        adaptive_tau(D, 0.5, floor=0.0)


def test_layer_labels_output_convention():
    from gapcache.analyze.evd import layer_labels

    np.testing.assert_array_equal(layer_labels(LAYERS, "output"), LAYERS - 1)
    np.testing.assert_array_equal(layer_labels(LAYERS), LAYERS)
    # the seed's EVD of a sample is ours - 1 (its layer j is our j + 1)
    np.testing.assert_array_equal(evd(D, layer_labels(LAYERS, "output"), 1.0, never_reached=0.0), [3, 1, 0, 7])
    with pytest.raises(ConfigError, match="'convention'"):
        layer_labels(LAYERS, "outputs")


def store_like():
    conds = ["original", "truncated_zero_Lm1", "truncated_zero_L2", "truncated_drop_L2"]
    gold = np.array([[-1.0, -2.0, -0.5],
                     [-4.0, -2.5, -3.5],
                     [-2.0, -2.0, np.nan],
                     [-1.5, -3.0, -0.5]])
    coords = {"condition": conds, "sample": ["s0", "s1", "s2"],
              "condition_kind": ("condition", ["original", "truncated", "truncated", "truncated"]),
              "truncation_layer": ("condition", [-999, -1, 2, 2]),
              "truncation_strategy": ("condition", ["", "zero", "zero", "drop"])}
    return xr.DataArray(gold, dims=("condition", "sample"), coords=coords)


def test_truncation_deltas_labelled_like_the_store():
    d = truncation_deltas(store_like())
    assert d.dims == ("strategy", "layer", "sample")
    assert d.strategy.values.tolist() == ["drop", "zero"] and d.layer.values.tolist() == [-1, 2]
    np.testing.assert_array_equal(d.sel(strategy="zero").values, [[3.0, 0.5, 3.0], [1.0, 0.0, np.nan]])
    np.testing.assert_array_equal(d.sel(strategy="drop", layer=2).values, [0.5, 1.0, 0.0])
    assert np.isnan(d.sel(strategy="drop", layer=-1).values).all()  # not in the store


def test_truncation_curves_with_forced_choice_accuracy():
    gold = store_like()
    cand = np.zeros((4, 3, 3))
    cand[0] = [[0.0, -1.0, 5.0], [-1.0, 0.0, -2.0], [0.0, -3.0, -1.0]]  # sample 0's best own candidate is 0 (2 masked)
    cand[1] = [[-2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]
    cand[2] = cand[0]
    cand[3] = cand[1]
    mask = np.array([[True, True, False], [True, True, True], [True, True, True]])
    gold_index = np.array([0, 1, 0])
    out = truncation_curves(gold, cand, mask, gold_index)
    # clean: s0 -> 0 ok, s1 -> 1 ok, s2 -> 0 ok
    assert float(out.clean_accuracy) == 1.0
    np.testing.assert_allclose(out.accuracy.sel(strategy="zero").values, [1 / 3, 1.0])
    np.testing.assert_allclose(out.mean_delta.sel(strategy="zero").values, [6.5 / 3, 0.5])
    assert out.n.sel(strategy="zero", layer=2).item() == 2


def test_truncation_deltas_on_a_real_store(tmp_path):
    from helpers import random_payloads, roundtrip, small_layout

    layout = small_layout()
    ds = roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    d = truncation_deltas(ds.gold_logprob)
    assert d.strategy.values.tolist() == ["zero"] and d.layer.values.tolist() == [0]
    want = ds.gold_logprob.sel(condition="original") - ds.gold_logprob.sel(condition="truncated_zero_L0")
    np.testing.assert_allclose(d.sel(strategy="zero", layer=0).values, want.values)
