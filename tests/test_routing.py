"""MoE routing (``extract.routing: true``) on the tiny Qwen3-VL-MoE, against the model's own router logits.

One run (3 sparse layers, 4 experts, top-2; 6 ragged samples in batches of 4, so rows are padded) under
``original``, ``blind_black`` and ``truncated`` (zero and drop after L = 0). For every condition and
batch a reference forward of the runner's own batch with ``output_router_logits=True`` (the condition's
intervention hooks on) gives per-token logits; from them:

* ``route_expert`` / ``route_weight`` at the text sites = top-k of softmax(logits), renormalized over k;
* ``route_load`` = counts of those top-k ids over the visual span and over the other prompt positions
  (teacher-forced answer and padding excluded).
"""

from __future__ import annotations

import html
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from gapcache.config import ModelConfig, load_config  # noqa: E402
from gapcache.errors import ConfigError  # noqa: E402
from gapcache.extract.models import ADAPTERS, get_adapter  # noqa: E402
from gapcache.extract.routing import check_routing  # noqa: E402
from gapcache.extract.runner import Extraction  # noqa: E402
from gapcache.extract.tiny import build_tiny_checkpoint  # noqa: E402
from gapcache.store import open_store  # noqa: E402
from gapcache.store.schema import SITES, STATUS_DONE  # noqa: E402
from gapcache.store.verify import verify  # noqa: E402
from helpers import ragged_samples  # noqa: E402

pytestmark = pytest.mark.integration

FAMILY = "qwen3_vl_moe"
N_LAYERS, N_EXPERTS, TOP_K = 3, 4, 2
CONDITIONS = ("original", "blind_black", "truncated_zero_L0", "truncated_drop_L0")


def config(path, routing=True, **extract):
    return load_config({
        "model": dict(family=FAMILY, id=str(path), dtype="float32", attn_implementation="sdpa"),
        "data": {"dataset": "synthetic", "options": {"n": 6, "image_size": 64}},
        "extract": {"conditions": ["original", "blind_black", "truncated"], "truncation_layers": [0],
                    "truncation_strategies": ["zero", "drop"], "batch_size": 4, "samples_per_shard": 4,
                    "max_length": 512, "routing": routing, **extract},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("routing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GAPCACHE_CACHE", str(tmp / "cache"))
        path = build_tiny_checkpoint(FAMILY, tmp / "ckpt", seed=0, num_layers=N_LAYERS)
        model, processor = get_adapter(FAMILY).load(ModelConfig(family=FAMILY, id=str(path), dtype="float32"))
        ex = Extraction(config(path), tmp / "out", model=model, processor=processor)
        ex.load()
        ex.plan(ragged_samples(6), show=False)
        ex.run(show=False)
        yield ex, open_store(ex.store_path), path


def batches(ex):
    e = ex.cfg.extract
    out = []
    for s0 in range(0, len(ex.planned), e.samples_per_shard):
        idx = [i for i in range(s0, min(s0 + e.samples_per_shard, len(ex.planned))) if ex.planned[i].ok]
        out += [idx[b : b + e.batch_size] for b in range(0, len(idx), e.batch_size)]
    return out


def reference_routing(ex, indices, cond):
    """Per layer (batch, seq, k) top-k ids and renormalized weights from ``output_router_logits``."""
    P = [ex.planned[i] for i in indices]
    inputs = ex.batch_inputs(indices, cond)
    with torch.no_grad(), ex.intervention(P, cond, inputs, offsets=[0] * len(P)):
        out = ex.model(**inputs, use_cache=False, output_router_logits=True)
    b, s = inputs["input_ids"].shape
    ids, weights = [], []
    for logits in out.router_logits:  # (batch*seq, experts) per sparse layer
        probs = torch.softmax(logits.float(), dim=-1)
        w, i = torch.topk(probs, TOP_K, dim=-1)
        ids.append(i.reshape(b, s, TOP_K).numpy())
        weights.append((w / w.sum(-1, keepdim=True)).reshape(b, s, TOP_K).numpy())
    return ids, weights


def test_the_store_holds_routing_with_its_coordinates(run):
    ex, ds, _ = run
    assert verify(ex.store_path).ok
    assert ds.route_expert.dims == ("condition", "sample", "site", "route_layer", "k")
    assert ds.route_load.dims == ("condition", "sample", "route_layer", "modality", "expert")
    assert ds.route_expert.shape[2:] == (len(SITES), N_LAYERS, TOP_K)
    assert [str(m) for m in ds.modality.values] == ["visual", "text"]
    np.testing.assert_array_equal(ds.expert.values, np.arange(N_EXPERTS))
    np.testing.assert_array_equal(ds.route_layer.values, np.arange(N_LAYERS))
    assert ds.route_expert.dtype == np.int16 and ds.route_load.dtype == np.int32
    assert "Qwen3VLMoeTextTopKRouter" in ds.attrs["routing"]["rule"]
    assert (ds.status.values == STATUS_DONE).all()
    assert [str(c) for c in ds.condition.values] == list(CONDITIONS)
    routers = get_adapter(FAMILY).routers(ex.model)
    assert len(routers) == N_LAYERS and all(r is not None and not r._forward_hooks for r in routers)  # removed


@pytest.mark.parametrize("label", CONDITIONS)
def test_routing_equals_top_k_of_the_models_own_router_logits(run, label):
    ex, ds, _ = run
    cond = {c.label: c for c in ex.conditions}[label]
    ci = [str(c) for c in ds.condition.values].index(label)
    got_ids, got_w, got_load = (ds[n].values[ci] for n in ("route_expert", "route_weight", "route_load"))
    assert len(batches(ex)) == 2 and max(len(b) for b in batches(ex)) == 4  # padded rows in a batch
    for indices in batches(ex):
        ref_ids, ref_w = reference_routing(ex, indices, cond)
        assert len(ref_ids) == N_LAYERS
        for r, i in enumerate(indices):
            p = ex.planned[i]
            sites = [p.sites[name] for name in SITES]
            for layer in range(N_LAYERS):
                np.testing.assert_array_equal(got_ids[i, :, layer], ref_ids[layer][r, sites])
                np.testing.assert_allclose(got_w[i, :, layer], ref_w[layer][r, sites], rtol=1e-6, atol=1e-7)
                vis = ref_ids[layer][r, p.visual_start : p.visual_start + p.visual_length]
                text = np.concatenate([ref_ids[layer][r, : p.visual_start],
                                       ref_ids[layer][r, p.visual_start + p.visual_length : len(p.prompt_ids)]])
                np.testing.assert_array_equal(got_load[i, layer, 0], np.bincount(vis.ravel(), minlength=N_EXPERTS))
                np.testing.assert_array_equal(got_load[i, layer, 1], np.bincount(text.ravel(), minlength=N_EXPERTS))
                assert got_load[i, layer].sum() == TOP_K * len(p.prompt_ids)  # every prompt position, nothing else
    np.testing.assert_allclose(np.nansum(got_w, -1), 1.0, rtol=1e-5)


def test_truncation_changes_the_routing_after_L(run):
    """Zeroed visual states after L = 0 route differently from `original` at the visual span of layer 1."""
    _, ds, _ = run
    labels = [str(c) for c in ds.condition.values]
    orig = ds.route_load.values[labels.index("original")]
    zero = ds.route_load.values[labels.index("truncated_zero_L0")]
    np.testing.assert_array_equal(orig[:, 0], zero[:, 0])  # layer 0 reads the real visual states
    assert (orig[:, 1:, 0] != zero[:, 1:, 0]).any()


def test_routing_is_refused_for_a_family_without_moe(tmp_path):
    for family in ADAPTERS:
        if family == FAMILY:
            check_routing(get_adapter(family))
            continue
        with pytest.raises(ConfigError, match="extract.routing"):
            check_routing(get_adapter(family))


def test_routing_off_keeps_the_config_hash_and_adds_no_arrays(run, tmp_path):
    import dataclasses

    ex, _, path = run
    off = config(path, routing=False)
    d = off.to_dict()
    del d["extract"]["routing"]
    assert off.hash() == load_config(d).hash()  # configs written before the option hash as before
    assert config(path).hash() != off.hash()
    ex_off = Extraction(off, tmp_path / "off", model=ex.model, processor=ex.processor)
    ex_off.load()
    ex_off.planned, ex_off.visual_select = ex.planned, ex.visual_select
    for attr in ("candidates", "cand_mask", "mean_rgb", "donor", "planner"):
        setattr(ex_off, attr, getattr(ex, attr))
    assert ex_off.layout().routing == () and "route_load" not in ex_off.unit_arrays(ex.conditions[0], ex_off.layout())
    res = ex_off.forward([0, 1], ex.conditions[0])
    assert not any(k.startswith("route_") for r in res for k in r)
    assert dataclasses.replace(ex_off.layout(), routing=()) == ex_off.layout()


# --------------------------------------------------------------------------- CPU tier: the routing metric
def test_routing_metric_functions_on_planted_counts():
    from gapcache.analyze.routing import jensen_shannon, topk_overlap, visual_expert_share

    assert jensen_shannon([1, 2, 3, 0], [2, 4, 6, 0]) == pytest.approx(0.0, abs=1e-12)  # same distribution
    assert jensen_shannon([5, 0, 0, 0], [0, 0, 1, 3]) == pytest.approx(1.0)  # disjoint supports
    assert jensen_shannon([1, 1], [1, 0]) == pytest.approx(1.5 - 0.75 * np.log2(3))  # 0.5*KL(p||m)+0.5*KL(q||m)
    assert np.isnan(jensen_shannon([0, 0], [1, 0]))
    assert visual_expert_share([3, 0, 2, 0], [1, 4, 2, 0]) == pytest.approx(1 / 3)  # experts 0,1,2 used; 0 visual
    np.testing.assert_array_equal(topk_overlap([[1, 2], [3, 0], [-1, 2]], [[2, 1], [3, 1], [2, 1]]), [1.0, 0.5, np.nan])


def test_routing_metric_on_the_tiny_moe_store(run, tmp_path, monkeypatch):
    from gapcache.analyze import metrics
    from gapcache.analyze import routing as routing_metric
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis

    ex, ds, _ = run
    monkeypatch.setitem(metrics.REGISTRY, "routing", routing_metric.METRIC)
    summary = run_analysis([ex.store_path], tmp_path / "a", AnalysisParams(metrics=("routing",), n_resamples=49))
    s = summary["stores"]["store"]
    m = s["metrics"]["routing"]
    assert "skipped" not in m and m["layers"] == list(range(N_LAYERS))
    labels = [str(c) for c in ds.condition.values]
    load = ds.route_load.values
    res = routing_metric.compute(ds, AnalysisParams(n_resamples=49), metrics.Context())
    jsd = res.arrays["route_jsd"].values
    i, layer = 1, 2
    expected = routing_metric.jensen_shannon(load[0, i, layer, 0], load[0, i, layer, 1])
    assert jsd[0, i, layer] == pytest.approx(float(expected)) and 0 < expected < 1
    np.testing.assert_allclose(m["jsd"]["original"]["estimate"], np.nanmean(jsd[0], axis=0))
    overlap = res.arrays["route_overlap"].values
    assert np.isnan(overlap[labels.index("original")]).all()
    np.testing.assert_array_equal(overlap[labels.index("truncated_zero_L0"), :, 0], 1.0)  # layer 0 is untouched
    assert set(m["overlap"]) == set(labels) - {"original"}
    report = (tmp_path / "a" / "report.html").read_text()
    assert "store/routing.png" in report and (tmp_path / "a" / "store" / "routing.png").is_file()
    rows = routing_metric.rows(s)
    assert len(rows) == 2 + len(labels) - 1
    assert all(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" in report for a, b in rows)


def test_routing_metric_skips_a_store_without_routing():
    from types import SimpleNamespace

    from gapcache.analyze import routing as routing_metric

    assert "skipped" in routing_metric.compute(SimpleNamespace(variables={}), None, None)


def test_dry_run_counts_the_routing_bytes(run, monkeypatch):
    from gapcache.extract import estimate
    from gapcache.store import arrays

    _, _, path = run
    seen = []
    real = arrays.bytes_per_sample

    def spy(sizes, *a, **kw):
        seen.append(real(sizes, *a, **kw))
        return seen[-1]

    monkeypatch.setattr(estimate.arrays, "bytes_per_sample", spy)
    for routing in (False, True):
        estimate.dry_run(config(path, routing=routing), n_probe=2)
    text_off, text_on = seen[0], seen[len(seen) // 2]  # the first condition of each run (same calls per run)
    per_sample = (2 * 2 + 2 * 4) * N_LAYERS * TOP_K + N_LAYERS * 2 * N_EXPERTS * 4  # ids, weights at 2 sites; load
    assert text_on - text_off == per_sample
