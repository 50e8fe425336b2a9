"""The metric registry: every registered metric gives summary entries, a figure and report rows, and a
metric registered by a test (no other edit) reaches the CLI, the summary, the results and the report."""

import html
import json

import numpy as np
import pytest
import xarray as xr

from gapcache.analyze import metrics
from gapcache.analyze.metrics import Context, Metric, MetricResult
from gapcache.analyze.pipeline import AnalysisParams, labelled, run_analysis
from gapcache.cli import main
from gapcache.errors import ConfigError, UnknownNameError
from test_extract_run import write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    cfg = write_config(tmp, conditions=["original", "blind_black", "truncated", "window", "patched"],
                       truncation_layers=[-1, 0, 1, 2, 3], truncation_strategies=["zero", "norm_noise"],
                       truncation_windows=[[0, 1]], window_strategies=["zero"],
                       patch_layers=[0, 2], patch_strategies=["zero", "swap"],
                       generate={"enabled": True, "max_new_tokens": 2},
                       attention=True, text="all")  # every registered metric runs on it (attention: the summaries;
    # geometry and checkpoint: every text token)
    assert main(["extract", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "store.zarr"


def table_row(label, value) -> str:
    return f"<tr><td>{html.escape(label)}</td><td>{html.escape(value)}</td></tr>"


def test_every_registered_metric_gives_summary_entries_a_figure_and_report_rows(store, tmp_path):
    out = tmp_path / "a"
    summary = run_analysis([store], out, AnalysisParams(n_resamples=49, n_splits=2))
    s = summary["stores"]["store"]
    assert tuple(s["metrics"]) == metrics.names() == tuple(s["timing_s"])
    report = (out / "report.html").read_text()
    # each figure again, from summary.json and results_store.zarr alone (what a later report reads)
    s_json = json.loads((out / "summary.json").read_text())["stores"]["store"]
    ctx = Context(cliff_layer=s_json["cliff_layer"], arrays=xr.open_zarr(out / "results_store.zarr"))
    again = tmp_path / "again"
    again.mkdir()
    for entry in metrics.registered():
        m = s["metrics"][entry.name]
        assert m and "skipped" not in m, (entry.name, m)
        fig = entry.figure(s_json, again, ctx)
        assert fig and (again / fig).is_file(), (entry.name, fig)
        assert (out / "store" / fig).is_file() and f"store/{fig}" in report, (entry.name, fig)
        rows = entry.rows(s)
        assert rows, entry.name
        for label, value in rows:
            assert table_row(label, value) in report, (entry.name, label)


# a toy metric: the number of samples and the cliff the metrics before it found, one array, a figure, a row
def toy_compute(ds, params, ctx):
    """{"n_samples", "cliff_seen"} and the array toy_ones (sample)."""
    n = ds.sizes["sample"]
    return MetricResult({"n_samples": n, "cliff_seen": ctx.cliff_layer},
                        {"toy_ones": labelled(ds, np.ones(n), ("sample",))})


def toy_figure(s, out, ctx):
    """toy.png: a bar of the sample count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.bar([0], [s["metrics"]["toy"]["n_samples"]])
    fig.savefig(out / "toy.png")
    plt.close(fig)
    return "toy.png"


def toy_rows(s):
    return [("toy samples", str(s["metrics"]["toy"]["n_samples"]))]


TOY = Metric("toy", toy_compute, toy_figure, toy_rows, "a metric registered by the test")


def test_a_registered_toy_metric_reaches_cli_summary_results_and_report(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a"
    assert main(["analyze", str(store), "--out", str(out), "--metrics", "toy"]) == 1  # not registered yet
    assert "The 'metrics' parameter must be a subset of ['accuracy'," in capsys.readouterr().err

    monkeypatch.setitem(metrics.REGISTRY, "toy", TOY)
    import gapcache.cli
    from gapcache.analyze import pipeline

    assert metrics.names()[-1] == "toy" and gapcache.cli.METRIC_NAMES == pipeline.METRICS == metrics.names()
    assert AnalysisParams().metrics == metrics.names()
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "toy (a metric registered by the test)" in " ".join(capsys.readouterr().out.split())

    assert main(["analyze", str(store), "--out", str(out), "--n-resamples", "49", "--metrics", "toy,evd"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())["stores"]["store"]
    assert list(s["metrics"]) == ["evd", "toy"]  # registry order, not the order asked
    assert s["metrics"]["toy"] == {"n_samples": 24, "cliff_seen": s["metrics"]["evd"]["cliff_layer"]}
    assert s["cliff_layer"] == s["metrics"]["evd"]["cliff_layer"] is not None
    assert "toy samples" in printed
    report = (out / "report.html").read_text()
    assert table_row("toy samples", "24") in report and "store/toy.png" in report
    assert (out / "store" / "toy.png").is_file()
    res = xr.open_zarr(out / "results_store.zarr")
    assert res.toy_ones.dims == ("sample",) and float(res.toy_ones.sum()) == 24 and "evd" in res


def test_registry_refuses_what_would_lose_or_overwrite_a_result():
    with pytest.raises(ConfigError, match="must not be registered already. Got 'evd'"):
        metrics.register(metrics.get("evd"))
    with pytest.raises(ConfigError, match="'compute' of Metric 'x' must be callable"):
        metrics.register(Metric("x", None, toy_figure, toy_rows))
    with pytest.raises(UnknownNameError, match="Unknown metric 'nope'. Supported metrics: accuracy"):
        metrics.get("nope")
    ctx = Context().updated(MetricResult({}, {"a": 1}, {"cliff_layer": 3.0}), "m1")
    assert ctx.cliff_layer == 3.0 and dict(ctx.arrays) == {"a": 1}
    with pytest.raises(ConfigError, match=r"must have names no earlier metric used. Got \['a'\]"):
        ctx.updated(MetricResult({}, {"a": 2}), "m2")
    with pytest.raises(ConfigError, match=r"must only set \['cliff_layer'\]. Got \['tau'\]"):
        ctx.updated(MetricResult({}, context={"tau": 1.0}), "m2")
    assert metrics.as_result({"skipped": "why"}, "m").summary == {"skipped": "why"}
    with pytest.raises(ConfigError, match="must return a MetricResult or a summary dict. Got int"):
        metrics.as_result(3, "m")


@pytest.fixture
def only(monkeypatch):
    """only(*entries): the registry holds just these entries, in this order, for the test."""
    def set_entries(*entries):
        monkeypatch.setattr(metrics, "REGISTRY", {e.name: e for e in entries})
        return tuple(e.name for e in entries)
    return set_entries


def pending_metric(name, events, context=None):
    """A metric whose compute returns a Pending (finished: the sample count and an array of ones, ``context`` if
    given); ``events`` records compute, finish and cancel in order."""
    def compute(ds, params, ctx):
        events.append(f"{name} compute")

        def finish():
            events.append(f"{name} finish")
            n = ds.sizes["sample"]
            return MetricResult({"n": n}, {f"{name}_ones": labelled(ds, np.ones(n), ("sample",))}, context or {})
        return metrics.Pending(finish, lambda: events.append(f"{name} cancel"))
    return Metric(name, compute, toy_figure, toy_rows)


def plain_metric(name, events, fail=False):
    def compute(ds, params, ctx):
        events.append(f"{name} compute")
        if fail:
            raise ValueError(f"{name} failed")
        return {"seen_cliff": ctx.cliff_layer}
    return Metric(name, compute, toy_figure, toy_rows)


def test_a_pending_metric_finishes_after_the_later_ones_in_its_own_place(store, only):
    from gapcache.analyze.pipeline import analyze_store
    from gapcache.store import open_store

    events = []
    names = only(pending_metric("late", events), plain_metric("after", events))
    s, res = analyze_store(open_store(store), AnalysisParams(metrics=names))
    assert events == ["late compute", "after compute", "late finish"]
    assert list(s["metrics"]) == ["late", "after"] and s["metrics"]["late"] == {"n": 24}
    assert set(s["timing_s"]) == {"late", "after"} and float(res.late_ones.sum()) == 24


def test_a_metric_that_starts_first_runs_before_the_others_and_keeps_its_registry_place(store, only):
    import dataclasses

    from gapcache.analyze.pipeline import analyze_store
    from gapcache.store import open_store

    events = []
    names = only(plain_metric("before", events), dataclasses.replace(pending_metric("early", events), starts_first=True))
    s, _ = analyze_store(open_store(store), AnalysisParams(metrics=names))
    assert events == ["early compute", "before compute", "early finish"]
    assert list(s["metrics"]) == list(s["timing_s"]) == ["before", "early"]


def test_a_pending_metric_may_not_set_the_context_and_is_cancelled_by_a_later_error(store, only):
    from gapcache.analyze.pipeline import analyze_store
    from gapcache.store import open_store

    ds = open_store(store)
    events = []
    names = only(pending_metric("late", events, context={"cliff_layer": 1.0}))
    with pytest.raises(ConfigError, match=r"metric 'late' finished after the metrics after it, so its 'context' "
                                          r"must be empty. Got \['cliff_layer'\] instead"):
        analyze_store(ds, AnalysisParams(metrics=names))
    events.clear()
    names = only(pending_metric("late", events), plain_metric("after", events, fail=True))
    with pytest.raises(ValueError, match="after failed"):
        analyze_store(ds, AnalysisParams(metrics=names))
    assert events == ["late compute", "after compute", "late cancel"]
