"""Integration: `gapcache analyze` on a store written by the real extraction path."""

import json

import numpy as np
import pytest
import xarray as xr

from gapcache.cli import METRIC_NAMES, main
from gapcache.analyze.pipeline import METRICS
from gapcache.store import open_store
from test_extract_run import write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("an")
    cfg = write_config(tmp, conditions=["original", "blind_black", "truncated"], truncation_layers=[-1, 0, 1, 2, 3],
                       truncation_strategies=["zero", "drop"])
    assert main(["extract", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "store.zarr"


def test_metric_names_agree():
    assert tuple(METRIC_NAMES) == tuple(METRICS)


def test_analyze_writes_summary_results_figures_and_report(store, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["analyze", str(store), "--out", str(out), "--n-resamples", "199", "--cliff-layer", "1",
                 "--metrics", "accuracy,truncation,evd,rank,lens"]) == 0
    assert "report.html" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())["stores"]["store"]
    assert s["cliff_layer"] == 1 and s["metrics"]["evd"]["cliff_source"] == "fixed (--cliff-layer)"
    ci = s["metrics"]["accuracy"]["per_condition"]["original"]
    assert {"estimate", "low", "high", "n", "level", "method", "n_resamples", "seed"} <= set(ci)
    assert ci["n"] == 24 and ci["n_resamples"] == 199 and ci["low"] <= ci["estimate"] <= ci["high"]
    assert s["metrics"]["rank"]["visual"]["original"]["er_ratio_cliff_layer"] == 1
    tr = s["metrics"]["truncation"]
    assert set(tr) == {"zero", "drop"} and tr["zero"]["layers"] == [-1, 0, 1, 2, 3]
    # truncating after the last layer changes nothing: Delta is exactly 0 there
    assert tr["zero"]["mean_delta"]["estimate"][-1] == 0.0
    for name in ("accuracy", "truncation", "delta_evd", "effective_rank", "logit_lens"):
        assert (out / "store" / f"{name}.png").is_file() and (out / "store" / f"{name}.pdf").is_file()
    html = (out / "report.html").read_text()
    assert "cliff layer" in html and "Provenance" in html and "store/truncation.png" in html
    res = xr.open_zarr(out / "results_store.zarr")
    assert res.delta.dims == ("strategy", "trunc_layer", "sample") and res.evd.sizes["sample"] == 24


def test_a_cliff_before_the_first_layer_leaves_the_er_ratio_undefined_not_the_analysis(store, tmp_path):
    """cliff -1 (the image is read in layer 0; the shipped tiny model's steepest cliff): no stored layer
    lies at or before it, so the ER ratio is recorded as undefined with the reason, and the rest is written."""
    out = tmp_path / "a"
    assert main(["analyze", str(store), "--out", str(out), "--n-resamples", "99", "--cliff-layer", "-1",
                 "--metrics", "evd,rank"]) == 0
    v = json.loads((out / "summary.json").read_text())["stores"]["store"]["metrics"]["rank"]["visual"]["original"]
    assert "er_ratio" not in v and v["er_ratio_cliff_layer"] == -1
    assert v["er_ratio_note"].startswith("undefined: cliff layer -1 leaves no stored layer on one side (layers 0..4)")
    assert v["er_ratio_note"] in (out / "report.html").read_text()


def test_lazy_and_eager_logit_lens_agree(store):
    from gapcache.analyze.lens import lens_choice_correct, logit_lens_correct
    from gapcache.analyze.scoring import gold_candidate_index

    ds = open_store(store)
    lazy = logit_lens_correct(ds).compute().values
    eager_ds = ds.load()
    gold = gold_candidate_index(eager_ds.answer.values, eager_ds.candidate.values)
    for c in range(ds.sizes["condition"]):
        for li in range(ds.sizes["layer"]):
            h = eager_ds.text_states.values[c, :, 1, li]
            want = lens_choice_correct(h, eager_ds.lens_norm_weight.values, eager_ds.lens_norm_weight.attrs["eps"],
                                       eager_ds.lens_unembed.values, eager_ds.candidate_lens_token.values, gold)
            np.testing.assert_array_equal(lazy[c, li], want)


def test_probes_run_per_candidate_set_and_category(store, tmp_path):
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store, probe_groups, strs

    summary, res = analyze_store(open_store(store), AnalysisParams(metrics=("probes",), n_resamples=99, n_splits=2))
    pr = summary["metrics"]["probes"]
    assert pr, "no probe task"
    # hard and easy (text-answerable) samples of one candidate set are separate tasks
    assert {t.rsplit(" ", 1)[1] for t in pr} == {"[hard]", "[easy]"}
    ds = open_store(store)
    for task, (idx, _) in probe_groups(ds, 2).items():
        assert set(strs(ds.category)[idx]) == {task.rsplit(" ", 1)[1].strip("[]")}
    for task, entry in pr.items():
        if "skipped" in entry:
            continue
        orig = entry["original"]["prediction"]
        assert len(orig["accuracy"]) == 5 and orig["accuracy_ci"]["n"] == orig["n"]
        assert "blind_black" in entry["vs_original"]


def test_samples_not_done_are_counted_per_probe_task_and_too_few_left_skips_the_task(store):
    """A sample failed under one probed condition leaves its task (paired: done in every condition); a class
    left with fewer samples than folds skips that task with the reason, and the other tasks count only their
    own exclusions (the last task's count was once reported for every task)."""
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store, probe_groups

    ds = open_store(store)
    tasks = probe_groups(ds, 2)
    *rest, last = list(tasks)
    status = ds.status.load().copy()
    failed = np.isin(np.arange(ds.sizes["sample"]), tasks[last][0][:1])
    status.loc[{"condition": "blind_black"}] = np.where(failed, 2, status.sel(condition="blind_black").values)
    ds["status"] = status
    summary, _ = analyze_store(ds, AnalysisParams(metrics=("probes",), n_resamples=99, n_splits=2, n_refits=2, jobs=1))
    pr = summary["metrics"]["probes"]
    assert pr[last] == {"skipped": "too few samples done in every probed condition"}  # a class of 1 < 2 folds
    assert rest and all(pr[t]["statistics"]["n_excluded_not_done"] == 0 for t in rest)


def test_worker_processes_give_the_serial_summary_and_figures(store, tmp_path):
    """--jobs 2 (probe fits and figures in two loky workers) against --jobs 1 (all in this process): the same
    summary (wall times aside) and byte-identical PNGs."""
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis
    from helpers import comparable_summary

    got = {}
    for jobs in (1, 2):
        p = AnalysisParams(metrics=("accuracy", "truncation", "evd", "rank", "probes"), n_resamples=99, n_splits=2,
                           jobs=jobs)
        got[jobs] = comparable_summary(run_analysis([store], tmp_path / str(jobs), p))
    assert got[1] == got[2] and '"probes"' in got[1]
    pngs = sorted(f.name for f in (tmp_path / "1" / "store").glob("*.png"))
    assert "probes.png" in pngs
    for name in pngs:
        assert (tmp_path / "1" / "store" / name).read_bytes() == (tmp_path / "2" / "store" / name).read_bytes(), name


def test_report_rows_give_where_each_probe_starts_decoding_beside_the_cliff():
    from gapcache.analyze.report import decodes_from, probe_rows

    def entry(low):
        return {"layers": [0, 1, 2, 3], "selectivity_ci": {"low": low}}

    assert decodes_from(entry([-0.1, 0.2, -0.05, 0.3])) == 3  # from there on, every later layer too
    assert decodes_from(entry([0.1, 0.2, 0.1, 0.3])) == 0
    assert decodes_from(entry([0.1, 0.2, 0.1, float("nan")])) is None
    probes = {"no/yes [easy]": {"original": {"prediction": entry([0.1] * 4)}},
              "no/yes [hard]": {"original": {"prediction": entry([-0.1, -0.1, 0.2, 0.3])},
                                "blind_black": {"prediction": entry([-0.1] * 4)}, "vs_original": {}},
              "skipped": "no candidate set"}
    assert probe_rows(probes) == [
        ("probe no/yes [hard] at prediction: selectivity CI > 0 from layer", "original 2, blind_black never"),
        ("probe no/yes [easy] at prediction: selectivity CI > 0 from layer", "original 0"),
    ]


def test_evd_gap_is_the_one_public_function_in_the_pipeline_and_across_stores(store, tmp_path):
    """The hard - easy gap of summary.json equals evd.evd_gap on the results' EVDs (below_grid rule), and
    the cross-store comparison (the store against itself) is a paired evd_gap: 0 with a degenerate interval."""
    from gapcache.analyze import evd
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis, strs

    out = tmp_path / "a"
    summary = run_analysis([store, store], out, AnalysisParams(metrics=("truncation", "evd"), n_resamples=199))
    g = summary["stores"]["store0"]["metrics"]["evd"]["gap_hard_minus_easy"]
    res = xr.open_zarr(out / "results_store0.zarr")
    cats = strs(open_store(store).category)
    e = res.evd.values
    keep = np.isfinite(res.delta.sel(strategy="zero").values).all(axis=0)  # samples the evd metric kept
    want = evd.evd_gap(e[keep & (cats == "hard")], e[keep & (cats == "easy")], "hard", "easy",
                       layers=res.delta.trunc_layer.values, n_resamples=199)
    assert (g["estimate"], g["low"], g["high"]) == pytest.approx((want.gap, want.low, want.high), rel=1e-12)
    assert g["never_reached"] == "below_grid" and g["never_reach_tau_counts_as"] == -2.0
    cmp = summary["comparisons"]["evd_gap_store0_minus_store1"]
    assert cmp["estimate"] == 0.0 and cmp["paired"] is True and cmp["degenerate"] is True
    assert cmp["never_reached"] == "below_grid" and cmp["paired_by"] == "sample id"


def test_preload_small_reads_the_small_lazy_variables_once_and_leaves_the_rest_lazy(monkeypatch):
    """Small lazy variables and coordinates come into memory (as dask arrays over the loaded values, with the same
    chunks), smallest first up to the total cap; larger ones and the rest are read from the store as before;
    values and the original dataset are untouched."""
    import dask.array as da

    from gapcache.analyze import pipeline

    monkeypatch.setattr(pipeline, "PRELOAD_VARIABLE_BYTES", 8000)
    monkeypatch.setattr(pipeline, "PRELOAD_TOTAL_BYTES", 9000)
    lazy = lambda n: da.arange(n, dtype=np.float64, chunks=max(1, n // 4))  # noqa: E731 (a graph, as a store's)
    ds = xr.Dataset({"tiny": ("a", lazy(10)), "small": ("e", lazy(300)), "mid": ("b", lazy(900)),
                     "over": ("d", lazy(1200))}, coords={"a": np.arange(10), "label": ("a", lazy(10))})
    got = pipeline.preload_small(ds)
    # 80 + 80 + 2400 bytes fit the total; mid's 7200 more would not; over's 9600 exceed one variable's cap
    before = {k: ds[k].data.name for k in ds.variables if ds[k].chunks is not None}
    read = {k: set(dict(got[k].data.dask)).isdisjoint(dict(ds[k].data.dask))  # no task of the store's graph left
            for k in ("tiny", "label", "small", "mid", "over")}
    assert read == {"tiny": True, "label": True, "small": True, "mid": False, "over": False}
    for k in ds.variables:
        np.testing.assert_array_equal(got[k].values, ds[k].values)
        assert got[k].chunks == ds[k].chunks, k
    assert {k: ds[k].data.name for k in before} == before  # the caller's dataset is untouched
