"""Through the pipeline, on stores with and without the token span (extract.text: all): derived text sites by
name (--site), the geometry metric (ICC, CKA, text-token ER) and the checkpoint section."""

import json

import numpy as np
import pytest
import xarray as xr
import yaml

from gapcache.analyze.geometry import cross_modal_cka, icc
from gapcache.analyze.pipeline import AnalysisParams, run_analysis
from gapcache.analyze.rank import effective_rank
from gapcache.analyze.textsites import DERIVED, with_sites
from gapcache.cli import main
from gapcache.errors import ConfigError
from gapcache.store import open_store
from gapcache.store.reader import span_rows

pytestmark = pytest.mark.integration
N = 24


def _extract(tmp, name, **extract):
    cfg = {"name": name, "model": {"family": "llava", "id": "builtin:tiny-llava", "dtype": "float32"},
           "data": {"dataset": "synthetic", "split": "test", "options": {"n": N, "image_size": 32, "seed": 1}},
           "extract": {"batch_size": 4, "samples_per_shard": 4, **extract}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["extract", str(path), "--out", str(tmp / name)]) == 0
    return tmp / name / "store.zarr"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geo")
    return (_extract(tmp, "all", conditions=["original", "blind_black", "truncated"],
                     truncation_layers=[-1, 0, 1, 2, 3], text="all"),
            _extract(tmp, "sites", conditions=["original"]))


def _roles(ds, i):
    names = list(ds.ttoken_role.attrs["roles"])
    off, n = int(ds.token_offset[i]), int(ds.token_length[i])
    return np.array([names[r] for r in ds.ttoken_role.values[off : off + n]])


def test_derived_sites_are_the_recorded_rows(stores):
    ds = open_store(stores[0])
    d2 = with_sites(ds, ["question_last", "text_last", "question_first", "question_mean", "instruction"])
    sites = [str(s) for s in d2.site.values]
    assert sites == ["instruction", "prediction", "question_last", "text_last", "question_first", "question_mean"]
    ts = d2.text_states.values  # (condition, sample, site, layer, hidden)
    np.testing.assert_array_equal(ts[:, :, 2], ts[:, :, 0])  # the last question token is the instruction site
    np.testing.assert_array_equal(ts[:, :, 3], ts[:, :, 1])  # the last prompt text token is the prediction site
    np.testing.assert_array_equal(d2.site_position.values[:, 2], ds.site_position.values[:, 0])
    np.testing.assert_array_equal(d2.site_position.values[:, 3], ds.site_position.values[:, 1])
    assert (d2.site_position.values[:, 5] == -1).all()  # a mean has no position
    for i in (0, 5, N - 1):
        rows = span_rows(ds, i, "token").values  # (condition, ttoken, layer, hidden)
        q = np.flatnonzero(_roles(ds, i) == "question")
        np.testing.assert_array_equal(ts[:, i, 4], rows[:, q[0]])
        np.testing.assert_allclose(ts[:, i, 5], rows[:, q].astype(np.float64).mean(axis=1), rtol=1e-6, atol=1e-7)
        first = q[0] + (int(ds.span_length[i]) if q[0] >= int(ds.visual_start[i]) else 0)
        assert d2.site_position.values[i, 4] == first


def test_unknown_or_unavailable_sites_are_refused_with_the_available_ones(stores, tmp_path, capsys):
    ds, plain = open_store(stores[0]), open_store(stores[1])
    with pytest.raises(ConfigError, match=r"must name sites of this store, one of \['instruction', 'prediction', "
                                          r"'question_mean'.* Got 'question_avg' instead\."):
        with_sites(ds, ["question_avg"])
    with pytest.raises(ConfigError, match=r"one of \['instruction', 'prediction'\]. Got 'question_mean' instead; "
                                          r"'question_mean' is derived from the token span, which this store lacks: "
                                          r"record it with extract.text: all"):
        with_sites(plain, ["question_mean"])
    assert main(["analyze", str(stores[1]), "--out", str(tmp_path / "a"), "--metrics", "rank",
                 "--site", "question_first"]) == 1
    assert "record it with extract.text: all" in capsys.readouterr().err
    assert len(DERIVED) == 12 and {"question_mean", "question_first", "question_last", "text_mean"} <= set(DERIVED)


def test_site_flag_reaches_the_rank_and_probe_metrics(stores, tmp_path):
    out = tmp_path / "a"
    assert main(["analyze", str(stores[0]), "--out", str(out), "--metrics", "rank", "--n-resamples", "49",
                 "--site", "question_mean,question_first"]) == 0
    s = json.loads((out / "summary.json").read_text())["stores"]["store"]
    assert list(s["metrics"]["rank"]["text"]["values"]["original"]) == ["instruction", "prediction", "question_mean",
                                                                       "question_first"]
    assert s["params"]["sites"] == ["question_mean", "question_first"]
    summary = run_analysis([stores[0]], tmp_path / "b", AnalysisParams(metrics=("probes",), sites=("question_mean",),
                                                                       n_splits=2, n_resamples=49))
    probes = summary["stores"]["store"]["metrics"]["probes"]
    task = next(t for t, v in probes.items() if isinstance(v, dict) and "original" in v)
    assert set(probes[task]["original"]) == {"instruction", "prediction", "question_mean"}
    assert probes[task]["vs_original"]["blind_black"]["question_mean"]["interval"]["n"] >= 2


@pytest.fixture(scope="module")
def analysed(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("an")
    p = AnalysisParams(metrics=("accuracy", "truncation", "evd", "rank", "geometry", "checkpoint"), n_resamples=99)
    return run_analysis([stores[0]], out, p), out


def test_geometry_arrays_are_the_pure_functions_of_each_samples_span_rows(stores, analysed):
    _, out = analysed
    ds, res = open_store(stores[0]), xr.open_zarr(out / "results_store.zarr")
    for i in (0, 7, N - 1):
        V = span_rows(ds, i, "visual").sel(visual_condition="original").values  # (vtoken, layer, hidden)
        T = span_rows(ds, i, "token").sel(token_condition="original").values  # (ttoken, layer, hidden)
        q = _roles(ds, i) == "question"
        for li in range(ds.sizes["layer"]):
            got = {k: float(res[f"geometry_{k}"].sel(visual_condition="original").values[i, li]) for k in ("icc", "cka")}
            assert got["icc"] == pytest.approx(float(icc(V[:, li])), rel=1e-9)  # batched: zero-padded
            assert got["cka"] == pytest.approx(float(cross_modal_cka(V[:, li], T[q, li])), rel=1e-9, abs=1e-12)
            er = float(res.geometry_text_er.sel(token_condition="original").values[i, li])
            assert er == pytest.approx(float(effective_rank(T[:, li])), rel=1e-9)


def test_checkpoint_section_and_estimates_agree_with_the_metrics_they_read(stores, analysed):
    summary, out = analysed
    s = summary["stores"]["store"]
    cp, geo = s["metrics"]["checkpoint"], s["metrics"]["geometry"]
    L = int(np.floor(s["cliff_layer"]))
    assert cp["cliff_layer"] == L and list(cp["checkpoints"]) == ["1", "2", "3"]
    crit = {e["key"]: e for c in cp["checkpoints"].values() for e in c["criteria"]}
    assert set(crit) == {"drop_hard", "drop_easy", "evd_gap", "visual_er_ratio", "text_er_ratio", "icc_change",
                         "cka_change"}
    for key, metric in (("icc_change", "icc"), ("cka_change", "cka"), ("text_er_ratio", "text_er")):
        assert crit[key]["estimate"]["estimate"] == pytest.approx(geo[metric]["original"]["change"]["estimate"])
        assert crit[key]["estimate"]["low"] == pytest.approx(geo[metric]["original"]["change"]["low"])
    er = s["metrics"]["rank"]["visual"]["original"]
    assert crit["visual_er_ratio"]["estimate"]["estimate"] == pytest.approx(er["er_ratio"]["estimate"])
    assert crit["evd_gap"]["estimate"]["estimate"] == pytest.approx(s["metrics"]["evd"]["gap_hard_minus_easy"]["estimate"])
    # the hard-sample drop is original - truncated_zero_L accuracy, paired, over the hard samples
    res = xr.open_zarr(out / "results_store.zarr")
    fc = res.forced_choice_correct
    hard = np.array([str(c) for c in open_store(stores[0]).category.values]) == "hard"
    label = crit["drop_hard"]["estimate"]["condition"]
    assert label == f"truncated_zero_L{L}".replace("L-1", "Lm1")
    want = (fc.sel(condition="original").values - fc.sel(condition=label).values)[hard].mean()
    assert crit["drop_hard"]["estimate"]["estimate"] == pytest.approx(want)
    report = (out / "report.html").read_text()
    assert f"Seed checkpoints (cliff L={L}" in report and (out / "store" / "checkpoints.png").is_file()
    assert (out / "store" / "geometry.png").is_file()


def test_without_the_token_span_icc_is_computed_and_cka_skipped_with_the_reason(stores, tmp_path):
    summary = run_analysis([stores[1]], tmp_path, AnalysisParams(metrics=("rank", "geometry", "checkpoint"),
                                                                 cliff_layer=1, n_resamples=49))
    s = summary["stores"]["store"]
    geo = s["metrics"]["geometry"]
    assert "original" in geo["icc"] and geo["icc"]["original"]["cliff_layer"] == 1
    assert geo["cka"] == geo["text_er"] == {"skipped": "no token span in the store (extract.text: all records every "
                                                       "prompt text token)"}
    crit = {e["key"]: e for c in s["metrics"]["checkpoint"]["checkpoints"].values() for e in c["criteria"]}
    assert crit["cka_change"]["verdict"] == "not available"
    assert crit["cka_change"]["reason"] == "needs the geometry (with the token span) metric"
    assert crit["drop_hard"]["reason"] == "no truncated_zero condition at layer 1 in the store"
    assert crit["icc_change"]["verdict"] in ("holds", "fails", "undecided (CI straddles the threshold)")
