"""The crossing layer and the transfer window (issue 13, deliverables 6-8, CPU tier): the simultaneous band,
the rule on planted curves whose answer is known exactly, its error rate under a global null, the per-group
split, swap donor-following, and the report leading with the transfer window."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from gapcache.analyze import metrics, transfer
from gapcache.analyze.metrics import Metric
from gapcache.errors import DataError

GRID = np.array([0, 2, 4, 6, 8, 10, 12])  # an irregular patched-layer grid: ends are reported as its labels


def planted(n=40, seed=1):
    """Delta_visual, Delta_text (sample, layer) with a large per-sample difficulty shared by both channels, and
    text - visual planted per layer: visual dominates at 0, 2; text at 4; neither at 6; text from 8 on."""
    rng = np.random.default_rng(seed)
    difficulty = 10 * rng.standard_normal((n, 1))  # cancels in the paired difference
    spread = rng.uniform(-0.5, 0.5, (n, 1))
    diff = np.array([-3, -3, 3, 0, 3, 3, 3])[None] + spread * (np.array([-3, -3, 3, 0, 3, 3, 3]) != 0)
    dv = difficulty + rng.standard_normal((n, len(GRID)))
    return dv, dv + diff


def test_planted_curves_give_the_crossing_and_the_window_exactly():
    dv, dt = planted()
    r = transfer.transfer_window(dv, dt, GRID, n_resamples=499, seed=0)
    assert r["significant_visual"] == [True, True, False, False, False, False, False]
    assert r["significant_text"] == [False, False, True, False, True, True, True]
    # text is significant at 4 but not at 6: the crossing is the first layer from which it *stays* significant
    assert (r["start"], r["crossing"], r["window"]) == (2, 8, [2, 8])
    # every resample finds the same ends: a null layer has d = 0 exactly, a planted one d >= 2.5 with sd <= 0.5
    assert r["crossing_ci"] == {"low": 8, "high": 8, "found_fraction": 1.0, "not_found_as": 13}
    assert r["start_ci"] == {"low": 2, "high": 2, "found_fraction": 1.0, "not_found_as": -1}
    diff = dt - dv
    np.testing.assert_allclose(r["difference"]["estimate"], diff.mean(0))
    np.testing.assert_allclose(r["difference"]["se"], diff.std(0, ddof=1) / np.sqrt(len(diff)))
    c = r["difference"]["critical"]
    np.testing.assert_allclose(r["difference"]["low"], diff.mean(0) - c * np.array(r["difference"]["se"]))
    assert r["n"] == 40 and r["layers"] == GRID.tolist() and "sup-t" in r["rule"]


def test_unpaired_noise_would_hide_what_the_paired_difference_shows():
    """The rule works on Delta_text - Delta_visual of each sample: a shared difficulty of sd 10 cancels."""
    dv, dt = planted()
    r = transfer.transfer_window(dv, dt, GRID, n_resamples=499)
    shuffled = transfer.transfer_window(dv, dt[np.random.default_rng(0).permutation(len(dt))], GRID, n_resamples=499)
    assert r["crossing"] == 8 and shuffled["crossing"] is None and shuffled["start"] is None


def test_ends_not_found_lie_one_step_beyond_the_grid():
    dv, dt = planted()
    r = transfer.transfer_window(dv, dv.copy(), GRID, n_resamples=99)  # identical channels: d = 0 everywhere
    assert r["crossing"] is None and r["start"] is None and r["window"] == [None, None]
    assert r["crossing_ci"] == {"low": 13, "high": 13, "found_fraction": 0.0, "not_found_as": 13}
    assert r["start_ci"] == {"low": -1, "high": -1, "found_fraction": 0.0, "not_found_as": -1}
    only_text = transfer.transfer_window(dv, dv + 1 + 0.1 * (np.arange(len(dv)) % 2)[:, None], GRID, n_resamples=99)
    assert (only_text["start"], only_text["crossing"]) == (None, 0)


def test_the_ends_cis_are_grid_layers_around_a_noisy_crossing():
    rng = np.random.default_rng(3)
    n = 30
    ramp = np.array([-2, -1, -0.5, 0, 0.5, 1, 2])
    dv = rng.standard_normal((n, len(GRID)))
    dt = dv + ramp + 1.5 * rng.standard_normal((n, len(GRID)))
    r = transfer.transfer_window(dv, dt, GRID, n_resamples=999, seed=0)
    for end in ("crossing", "start"):
        ci = r[f"{end}_ci"]
        assert {ci["low"], ci["high"]} <= set(GRID.tolist()) | {ci["not_found_as"]}
        if r[end] is not None:
            assert ci["low"] <= r[end] <= ci["high"]
    assert r["crossing_ci"]["high"] > r["crossing_ci"]["low"]  # noisy: the crossing is not pinned to one layer


def test_sup_t_critical_value_is_one_layer_s_for_copies_and_sidak_s_for_independent_layers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 1))
    one = transfer.sup_t_band(x, n_resamples=1999).critical
    assert transfer.sup_t_band(np.tile(x, (1, 5)), n_resamples=1999).critical == pytest.approx(one, rel=1e-12)  # max over copies
    assert one == pytest.approx(norm.ppf(0.975), abs=0.1)
    L = 8
    sidak = norm.ppf(1 - (1 - 0.95 ** (1 / L)) / 2)  # the max of L independent |z|: 2.73
    c = transfer.sup_t_band(rng.standard_normal((2000, L)), n_resamples=1999).critical
    assert c == pytest.approx(sidak, abs=0.12) and c > one + 0.5


def test_bad_inputs_are_refused_with_the_shapes():
    dv, dt = planted()
    with pytest.raises(DataError, match="increasing layer grid"):
        transfer.transfer_window(dv, dt, GRID[::-1])
    with pytest.raises(DataError, match="finite \\(sample, layer\\) array.*1 non-finite"):
        transfer.transfer_window(np.where(np.arange(dv.size).reshape(dv.shape) == 3, np.nan, dv), dt, GRID)


def claims(n_sim, critical=None, n=50, L=8, rho=0.5, seed=0):
    """Fraction of global-null simulations (every layer: E[Delta_text - Delta_visual] = 0, AR(1) correlation rho
    across layers) in which the rule claims anything (a start or a crossing). ``critical``: force a pointwise
    critical value instead of the simultaneous one."""
    rng = np.random.default_rng(seed)
    hits = 0
    for k in range(n_sim):
        e = rng.standard_normal((n, L))
        d = np.empty_like(e)
        d[:, 0] = e[:, 0]
        for j in range(1, L):
            d[:, j] = rho * d[:, j - 1] + np.sqrt(1 - rho**2) * e[:, j]
        if critical is None:
            r = transfer.transfer_window(np.zeros_like(d), d, np.arange(L), n_resamples=499, seed=k)
            hits += r["start"] is not None or r["crossing"] is not None
        else:
            t = d.mean(0) / (d.std(0, ddof=1) / np.sqrt(n))
            hits += bool((np.abs(t) > critical).any())
    return hits / n_sim


@pytest.mark.slow
def test_under_a_global_null_the_window_claim_error_rate_is_controlled():
    rate = claims(300)
    # nominal 0.05; binomial sd at 300 draws is 0.013: allow 3 sd (the percentile sup-t band at n = 50)
    assert rate <= 0.05 + 3 * 0.013, rate
    # without the multiplicity rule (each layer at its own 95%) the claim rate is several times larger
    assert claims(300, critical=norm.ppf(0.975)) > 2.5 * max(rate, 0.05)


def test_by_group_is_the_rule_on_each_group_s_samples():
    dv, dt = planted(n=40)
    groups = np.array(["colour"] * 20 + ["count"] * 19 + ["rare"])
    out = transfer.by_group(dv, dt, GRID, groups, min_samples=5, n_resamples=199)
    assert set(out) == {"colour", "count", "rare"} and out["rare"] == {"skipped": "1 samples (fewer than 5)"}
    assert out["colour"] == transfer.transfer_window(dv[:20], dt[:20], GRID, n_resamples=199)
    assert out["count"]["n"] == 19 and out["count"]["crossing"] == 8


def test_forced_choice_predicts_among_the_sample_s_own_candidates():
    lp = np.array([[[0.0, 5.0, -1.0], [2.0, 2.0, 9.0], [np.nan, np.nan, np.nan]]])  # (1, sample, candidate)
    mask = np.array([[True, False, True], [True, True, False], [True, True, True]])
    assert transfer.forced_choice(lp, mask).tolist() == [[0, 0, -1]]  # masked-out 5.0 / 9.0 ignored; tie: first


def test_donor_following_counts_informative_samples_against_chance_and_clean():
    # candidates [a, b, c]; samples 0-3 choose among all three, 4 among a, b only
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
    gold = np.array([0, 1, 2, 0, 1])
    donor = np.array([1, 2, 3, 0, 2])  # donor's gold: 1, 2, 0, 0, 2 -> sample 3 (same gold) and 4 (c not
    #                                    among its candidates) are not informative
    pred = np.array([[1, 2, 0, 0, 1],   # layer 0: every informative answer follows the donor
                     [0, 2, 2, 0, 1]])  # layer 1: only sample 1 does
    clean = np.array([0, 1, 0, 0, 1])   # sample 2's clean answer already equals its donor's gold
    assert transfer.donor_gold(gold, donor).tolist() == [1, 2, 0, 0, 2]
    assert transfer.donor_gold(gold, np.array([-1, 0, 0, 0, 0])).tolist()[0] == -1
    r = transfer.donor_following(pred, clean, gold, transfer.donor_gold(gold, donor), mask, n_resamples=99)
    assert (r["n_informative"], r["n"]) == (3, 5)
    assert r["follows"]["estimate"] == pytest.approx([1.0, 1 / 3])
    assert r["chance"] == pytest.approx(1 / 3) and r["clean_follows"] == pytest.approx(1 / 3)
    assert r["follows_minus_chance"]["estimate"] == pytest.approx([2 / 3, 0.0])
    assert r["follows_minus_clean"]["estimate"] == pytest.approx([2 / 3, 0.0])
    assert r["follows"]["degenerate"] == [True, False]  # all three follow at layer 0: zero width, flagged
    none = transfer.donor_following(pred, clean, gold, np.full(5, -1), mask)
    assert none["skipped"] == "0 informative samples (need >= 2)"


def test_a_lead_metric_that_ran_comes_first_in_the_report(tmp_path):
    from gapcache.analyze.report import key_numbers, write_report

    def fig(name):
        return lambda s, out, ctx: None

    lead = Metric("lead_toy", lambda *a: {}, fig("lead_toy"), lambda s: [("lead row", "1")], lead=True)
    plain = Metric("plain_toy", lambda *a: {}, fig("plain_toy"), lambda s: [("plain row", "2")])
    saved = dict(metrics.REGISTRY)
    metrics.REGISTRY.clear()
    try:
        metrics.REGISTRY.update({"plain_toy": plain, "lead_toy": lead})
        ran = {"metrics": {"plain_toy": {"x": 1}, "lead_toy": {"x": 1}}}
        assert [m.name for m in metrics.report_order(ran["metrics"])] == ["lead_toy", "plain_toy"]
        assert key_numbers(ran) == [("lead row", "1"), ("plain row", "2")]
        skipped = {"metrics": {"plain_toy": {"x": 1}, "lead_toy": {"skipped": "no patched condition"}}}
        assert key_numbers(skipped) == [("plain row", "2"), ("lead_toy", "skipped: no patched condition")]
        summary = {"stores": {"store": {**ran, "store": {}, "params": {}, "timing_s": {}}}}
        html = write_report(summary, tmp_path).read_text()
        assert html.index("lead row") < html.index("plain row")
    finally:
        metrics.REGISTRY.clear()
        metrics.REGISTRY.update(saved)


# --------------------------------------------------------------------------- from a store (synthetic values)

N, PATCH_LAYERS = 40, [0, 1, 2, 3]
PLANTED = np.array([-3.0, 0.0, 3.0, 3.0])  # text - visual: visual dominates at 0, neither at 1, text from 2 on


def patched_store(path, deepstack=None):
    """A store with original and patched (both channels zero, visual swap) at PATCH_LAYERS whose gold log-probs
    plant PLANTED, with a shared per-sample difficulty; swap at layer 0 answers the donor's gold, later its own.
    ``deepstack``: the store's deepstack_layers attribute (None: not recorded, as before gapcache recorded it)."""
    from gapcache import conditions
    from gapcache.store import Layout, StoreWriter, create, open_store
    from helpers import random_payloads

    conds = conditions.expand(["original", "patched"], patch_layers=PATCH_LAYERS, patch_channels=["visual", "text"],
                              patch_strategies=["zero", "swap"])
    layout = Layout(sample_ids=tuple(f"s{i}" for i in range(N)), conditions=tuple(conds), layers=(0, 1, 2, 3, 4),
                    hidden=4, model_dtype="float32", candidates=("no", "yes"), visual_lengths=(2,) * N,
                    samples_per_shard=8, visual_chunk_tokens=4)
    rng = np.random.default_rng(0)
    gold = np.arange(N) % 2  # answer index: no, yes, no, ...
    donor = (np.arange(N) + 1) % N  # every donor's gold differs from the sample's own
    clean = rng.normal(-1, 1, N)
    dv = np.abs(rng.normal(2, 1, (N, 4)))
    spread = rng.uniform(-0.5, 0.5, (N, 4)) * (PLANTED != 0)
    gl = {"original": clean}
    cand = {"original": gold}
    for j, L in enumerate(PATCH_LAYERS):
        gl[f"patched_visual_zero_L{L}"] = clean - dv[:, j]
        gl[f"patched_text_zero_L{L}"] = clean - dv[:, j] - (PLANTED[j] + spread[:, j])  # float32 both: d = 0 at 1
        gl[f"patched_visual_swap_L{L}"] = clean - 5
        cand[f"patched_visual_zero_L{L}"] = cand[f"patched_text_zero_L{L}"] = gold
        cand[f"patched_visual_swap_L{L}"] = gold[donor] if L == 0 else gold
    payloads = random_payloads(layout)
    labels = [c.label for c in conds]
    for pl in payloads:
        idx = list(layout.shard_samples(pl.shard))
        label = labels[pl.condition]
        pl.values["gold_logprob"] = gl[label][idx].astype(np.float32)
        lp = np.full((len(idx), 2), -5.0, np.float32)
        lp[np.arange(len(idx)), cand[label][idx]] = -0.1
        pl.values["candidate_logprob"] = lp
    meta = {"question": np.array([f"q{i}" for i in range(N)], dtype=object),
            "answer": np.array(["no", "yes"], dtype=object)[gold],
            "category": np.array(["hard", "easy"] * (N // 2), dtype=object),
            "candidate_mask": np.ones((N, 2), bool), "label": gold.astype(np.int32)}
    attrs = {"model": {"id": "test"}, "condition_params": {"patched": {"swap": {"donor": donor.tolist()}}}}
    if deepstack is not None:
        attrs.update({"deepstack_layers": list(deepstack), "model": {"id": "test", "n_layers": 4}})
    create(path, layout, attrs, meta)
    with StoreWriter(path) as w:
        for pl in payloads:
            w.submit(pl)
    return open_store(path), dv, spread


def test_patching_and_swap_metrics_from_the_store(tmp_path):
    from gapcache.analyze import patching
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.report import write_report

    ds, dv, spread = patched_store(tmp_path / "store.zarr")
    p = AnalysisParams(metrics=("accuracy", "patching", "swap"), n_resamples=199)
    summary, results = analyze_store(ds, p)
    m = summary["metrics"]["patching"]
    assert (m["channels"], m["strategies"], m["layers"], m["headline"]) == (["visual", "text"], ["zero", "swap"],
                                                                            PATCH_LAYERS, "zero")
    w = m["transfer"]["zero"]["logprob"]
    assert (w["start"], w["crossing"], w["window"]) == (0, 2, [0, 2])
    assert w["crossing_ci"]["low"] == w["crossing_ci"]["high"] == 2 and w["start_ci"]["low"] == 0
    assert set(m["transfer"]) == {"zero"}  # swap has no text channel: no window
    np.testing.assert_allclose(m["curves"]["visual"]["zero"]["delta"]["estimate"], dv.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m["curves"]["text"]["zero"]["delta"]["estimate"], (dv + PLANTED + spread).mean(0),
                               rtol=1e-5)
    assert m["curves"]["visual"]["swap"]["accuracy_drop"]["estimate"] == [1.0, 0.0, 0.0, 0.0]
    acc = m["transfer"]["zero"]["accuracy"]  # zero patching never changes an answer here: nothing significant
    assert (acc["start"], acc["crossing"]) == (None, None)
    assert set(m["transfer"]["zero"]["per_category"]) == {"easy", "hard"}
    assert m["transfer"]["zero"]["per_category"]["hard"]["n"] == N // 2
    assert results.patch_delta.dims == ("channel", "patch_strategy", "patch_layer", "sample")
    groups = np.array(["a", "b"] * (N // 2))
    assert patching.windows_by(ds, groups, n_resamples=199)["a"]["crossing"] == 2
    s = summary["metrics"]["swap"]
    assert s["layers"] == PATCH_LAYERS and s["n_informative"] == N and s["chance"] == 0.5
    assert s["follows"]["estimate"] == [1.0, 0.0, 0.0, 0.0] and s["clean_follows"] == 0.0
    assert s["per_category"]["hard"]["n_informative"] == N // 2
    out = tmp_path / "report"
    html = write_report({"stores": {"store": {**summary, "path": "x"}}}, out, {"store": results}).read_text()
    assert (out / "store" / "transfer_window.png").is_file() and (out / "store" / "swap.png").is_file()
    assert html.index("transfer window (zero, log-prob Delta)") < html.index("accuracy original")
    assert html.index("store/transfer_window.png") < html.index("store/accuracy.png")
    assert "start 0 [0, 0] (found in 100% of resamples) -&gt; crossing 2 [2, 2] (found in 100% of resamples)" in html
    none = {"start": None, "start_ci": {"low": -1, "high": 1, "found_fraction": 0.25, "not_found_as": -1},
            "crossing": 3, "crossing_ci": {"low": 3, "high": 4, "found_fraction": 0.9, "not_found_as": 4},
            "n": 5, "level": 0.95, "layers": [0, 1, 2, 3]}
    assert patching.window_text(none) == ("start none [none, 1] (found in 25% of resamples) -> crossing 3 [3, none] "
                                          "(found in 90% of resamples) (n=5; FWER <= 0.05 over 4 layers, sup-t band)")
    assert "cliff layer (truncation; secondary to the transfer window)" in html
    one_channel = {"metrics": {"patching": {**m, "headline": None, "transfer": {}}}}  # e.g. visual patching only
    assert patching.figure(one_channel, tmp_path, metrics.Context()) == "transfer_window.png"
    assert [k for k, _ in patching.rows(one_channel)] == [  # no window, no cliff: the curves' rows only
        "patching visual zero: Delta at l=0 -> l=3", "patching visual swap: Delta at l=0 -> l=3",
        "patching text zero: Delta at l=0 -> l=3"]
    want = m["curves"]["text"]["zero"]["delta"]["estimate"]
    assert dict(patching.rows(one_channel))["patching text zero: Delta at l=0 -> l=3"].startswith(
        f"{want[0]:.3f} -> {want[-1]:.3f}, accuracy drop +0.000 -> +0.000 (n={N})")


def test_deepstack_flags_the_visual_patches_an_add_follows_and_keeps_their_numbers(tmp_path):
    """A store recording deepstack_layers [0, 1] (Qwen3-VL-like): the visual patches at l = 0, 1 are flagged in the
    summary (per curve, per transfer window, per swap layer) and in the report rows, with the same numbers as the
    store without the attribute; [] flags nothing; no attribute says it cannot tell."""
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.report import key_numbers

    p = AnalysisParams(metrics=("accuracy", "patching", "swap"), n_resamples=99)
    runs = {name: analyze_store(patched_store(tmp_path / f"{name}.zarr", deepstack)[0], p)[0]
            for name, deepstack in (("qwen3", (0, 1)), ("none", ()), ("old", None))}
    m = runs["qwen3"]["metrics"]["patching"]
    assert m["deepstack"]["layers"] == [0, 1] and "l <= max(deepstack_layers)" in m["deepstack"]["rule"]
    assert m["deepstack"]["readded"] == {"visual": {"zero": {"0": [0, 1], "1": [1]}, "swap": {"0": [0, 1],
                                                                                               "1": [1]}}}
    assert m["curves"]["visual"]["zero"]["deepstack_readded"] == [0, 1]
    assert "deepstack_readded" not in m["curves"]["text"]["zero"]
    assert m["transfer"]["zero"]["deepstack_readded"] == [0, 1]
    assert runs["qwen3"]["metrics"]["swap"]["deepstack_readded"] == [0, 1]
    base = runs["none"]["metrics"]["patching"]
    assert base["deepstack"] == {"layers": [], "rule": m["deepstack"]["rule"], "readded": {}}
    assert "deepstack_readded" not in base["curves"]["visual"]["zero"] and "deepstack_readded" not in base[
        "transfer"]["zero"]
    def numbers(entry):
        return {k: v for k, v in entry.items() if k != "deepstack_readded"}

    # the numbers are kept, flagged or not
    assert {c: {s: numbers(v) for s, v in per.items()} for c, per in m["curves"].items()} == base["curves"]
    assert {s: numbers(v) for s, v in m["transfer"].items()} == base["transfer"]
    assert numbers(runs["qwen3"]["metrics"]["swap"]) == runs["none"]["metrics"]["swap"]
    assert runs["old"]["metrics"]["patching"]["deepstack"]["layers"] is None
    assert "does not record 'deepstack_layers'" in runs["old"]["metrics"]["patching"]["deepstack"]["note"]
    rows = dict(key_numbers(runs["qwen3"]))
    assert rows["deepstack re-adds the image (visual patches)"].startswith(
        "after decoder layers 0, 1: a visual patch at l = 0, 1 removes the image only until the next add")
    assert rows["swap: answers following the donor at L=1"].endswith(
        "; deepstack re-adds the sample's own image after this layer")
    assert "deepstack" not in rows["swap: answers following the donor at L=2"]
    for name in ("none", "old"):
        assert not any("deepstack" in k + v for k, v in key_numbers(runs[name]))


def test_a_store_without_patched_conditions_skips_both_metrics(tmp_path):
    from gapcache.analyze import patching
    from gapcache.analyze.pipeline import AnalysisParams
    from helpers import random_payloads, roundtrip, small_layout

    layout = small_layout()
    ds = roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    p = AnalysisParams(n_resamples=9)
    assert patching.compute(ds, p, metrics.Context()) == {"skipped": "no patched condition in the store"}
    assert patching.swap(ds, p, metrics.Context()) == {"skipped": "no visual swap condition in the store"}
