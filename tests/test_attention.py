"""Attention summaries at the query sites (issue 14, item 1), on every family's tiny model.

1. the summaries computed inside the forward (gapcache's AttentionInterface function, no
   ``output_attentions``, no seq x seq map) equal the same summaries computed from eager
   ``output_attentions=True`` maps (float tolerance: float32 softmax of the same scores, two orders
   of summation), under ``original`` and under ``drop`` truncation (whose visual mass is 0 after L);
2. the outputs and the recorded hidden states are bit for bit those of a plain SDPA forward;
3. with ``extract.attention`` on, a run stores ``attn_mass`` / ``attn_visual`` with their coordinates;
   off (the default), the store and the config hash are those of before the option.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from gapcache.config import DEMO, load_config  # noqa: E402
from gapcache.extract import attention as att  # noqa: E402
from gapcache.extract.models import ADAPTERS, get_adapter  # noqa: E402
from gapcache.extract.runner import Extraction  # noqa: E402
from gapcache.extract.tiny import build_tiny_checkpoint  # noqa: E402
from gapcache.store import open_store  # noqa: E402
from helpers import ragged_samples  # noqa: E402

pytestmark = pytest.mark.integration

FAMILIES = tuple(ADAPTERS)
N_LAYERS = 3
N_SAMPLES = 4
L = 0  # truncated_drop_L0: visual keys hidden from text queries at decoder layers 1, 2
RTOL, ATOL = 1e-4, 2e-6


def config(family, path, attn_impl, attention=True):
    mcfg = dict(family=family, id=str(path), dtype="float32", attn_implementation=attn_impl)
    return load_config({
        "model": mcfg,
        "data": {"dataset": "synthetic", "options": {"n": N_SAMPLES, "image_size": 64}},
        "extract": {"conditions": ["original", "blind_black", "truncated"], "truncation_layers": [L],
                    "truncation_strategies": ["drop"], "batch_size": 2, "samples_per_shard": 4,
                    "max_length": 512, "attention": attention},
    })


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory, one_thread):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"attn-{family}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GAPCACHE_CACHE", str(tmp / "cache"))
        path = build_tiny_checkpoint(family, tmp / "ckpt", seed=0, num_layers=N_LAYERS)
        samples = ragged_samples(N_SAMPLES)
        out = {}
        for impl in ("sdpa", "eager"):
            cfg = config(family, path, impl)
            model, processor = get_adapter(family).load(cfg.model)
            ex = Extraction(cfg, tmp / f"out-{impl}", model=model, processor=processor)
            ex.load()
            ex.plan(samples, show=False)
            out[impl] = ex
        yield SimpleNamespace(family=family, sdpa=out["sdpa"], eager=out["eager"], samples=samples, tmp=tmp,
                              cond={c.label: c for c in out["sdpa"].conditions})


def eager_reference(ex, batch, cond):
    """Summaries from the eager model's full maps (output_attentions), with the condition's hooks on."""
    P = [ex.planned[i] for i in batch]
    inputs = ex.batch_inputs(batch, cond)
    with torch.inference_mode(), ex.intervention(P, cond, inputs, offsets=[0] * len(P)):
        out = ex.model(**inputs, use_cache=False, output_attentions=True)
    maps = np.stack([a.float().numpy() for a in out.attentions])  # (layer, b, h, seq, seq)
    assert maps.shape[0] == N_LAYERS
    return att.reference(maps, P, inputs["input_ids"].shape[1], ex.record, ex.n_layers)


def test_question_span_ends_at_the_instruction_site(fam):
    for p in fam.sdpa.planned:
        assert p.ok, p.failure
        q0, q1 = p.question_span
        assert 0 < q0 < q1 and q1 - 1 == p.instruction, (p.question_span, p.instruction)
        assert q0 >= p.visual_start + p.visual_length or q1 <= p.visual_start


@pytest.mark.parametrize("label", ("original", f"truncated_drop_L{L}"))
def test_summaries_equal_those_of_eager_output_attentions(fam, label):
    cond = fam.cond[label]
    for batch in ([0, 1], [2, 3], [1]):  # padded ragged batches; one unpadded row (SDPA: no mask at all)
        got = fam.sdpa.forward(batch, cond)
        ref = eager_reference(fam.eager, batch, cond)
        got_eager = fam.eager.forward(batch, cond)  # the gapcache function on an eager model (its eager output)
        for g, r in zip(got + got_eager, ref + ref):
            for name in att.ARRAYS:
                assert g[name].shape == r[name].shape, name
                np.testing.assert_allclose(g[name], r[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} {batch}")
            m = g["attn_mass"]
            assert np.isnan(m[:, -1]).all()  # the last hidden-state index has no attention
            np.testing.assert_allclose(m[:2, :-1, :, :3].sum(-1), 1.0, rtol=1e-5)  # every key is in one group


def test_drop_hides_the_visual_span_after_L(fam):
    """Known answer: under drop after L the text queries' mass on the visual span is exactly 0 (and its
    statistics undefined); at layers <= L it is the original's."""
    batch = [0, 1]
    orig = fam.sdpa.forward(batch, fam.cond["original"])
    drop = fam.sdpa.forward(batch, fam.cond[f"truncated_drop_L{L}"])
    for o, d in zip(orig, drop):
        vis = d["attn_mass"][..., 0]  # (query, layer, head)
        assert (vis[:, L + 1 : N_LAYERS] == 0).all()
        assert np.isnan(d["attn_visual"][:, L + 1 : N_LAYERS]).all()
        assert (o["attn_mass"][:, : N_LAYERS, :, 0] > 0).all()
        np.testing.assert_array_equal(d["attn_mass"][:, : L + 1], o["attn_mass"][:, : L + 1])


def test_outputs_and_hidden_states_unchanged_bit_for_bit(fam):
    """The gapcache attention function computes each layer's output with the plain SDPA call (eager model: the
    family's eager function), on the same arguments and the same mask: outputs equal bit for bit."""
    for ex in (fam.sdpa, fam.eager):
        _unchanged(ex, fam)
    for ex, base in ((fam.sdpa, "sdpa"), (fam.eager, "eager")):
        assert att.text_config(ex.adapter, ex.model)._attn_implementation == base  # switched back


def _unchanged(ex, fam):
    for label in ("original", f"truncated_drop_L{L}"):
        for batch in ([0, 1], [3]):
            on = ex.forward(batch, fam.cond[label])
            ex.cfg.extract.attention = False
            try:
                off = ex.forward(batch, fam.cond[label])
            finally:
                ex.cfg.extract.attention = True
            for a, b in zip(on, off):
                assert not set(att.ARRAYS) & set(b)
                for key in b:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_run_stores_the_summaries(fam, tmp_path):
    if fam.family != "qwen2_vl":
        pytest.skip("the store path is family-independent: one family")
    ex = fam.sdpa
    ex.out = tmp_path
    ex.store_path = tmp_path / "store.zarr"
    ex.run(show=False)
    ds = open_store(ex.store_path)
    assert ds.attn_mass.dims == ("condition", "sample", "attn_query", "layer", "attn_head", "attn_target")
    assert ds.attn_visual.dims == ("condition", "sample", "attn_query", "layer", "attn_head", "attn_stat")
    assert list(ds.attn_target.values) == list(att.TARGETS) and list(ds.attn_stat.values) == list(att.STATS)
    heads = att.n_heads(att.text_config(ex.adapter, ex.model))
    assert ds.sizes["attn_head"] == heads
    ci = [str(c) for c in ds.condition.values].index("original")
    res = ex.forward([0, 1], fam.cond["original"])
    for j, r in enumerate(res):
        np.testing.assert_allclose(ds.attn_mass.values[ci, j], r["attn_mass"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds.attn_visual.values[ci, j], r["attn_visual"], rtol=1e-5, atol=1e-6)
    from gapcache.store.verify import verify

    rep = verify(ex.store_path)
    assert rep.ok, rep.problems


def test_off_by_default_and_the_config_hash_of_before():
    cfg = load_config(DEMO)
    assert cfg.extract.attention is False
    on = load_config({**DEMO, "extract": {**DEMO["extract"], "attention": True}})
    off = load_config({**DEMO, "extract": {**DEMO["extract"], "attention": False}})
    assert off.hash() == cfg.hash() != on.hash()
    assert cfg.hash() == "6626e1676c66d8f9"  # the demo config's hash before the option existed (round 1's code)


# --------------------------------------------------------------------------- known answer (trained tiny model)
@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """The shipped trained model (builtin:tiny-llava-shapes) on 96 of its synthetic samples, attention on."""
    cfg = load_config({
        "model": {"family": "llava", "id": "builtin:tiny-llava-shapes", "dtype": "float32"},
        "data": {"dataset": "synthetic", "options": {"n": 96, "image_size": 64, "seed": 0, "placement": "centre"}},
        "extract": {"conditions": ["original", "blind_black", "truncated"], "truncation_layers": [1],
                    "truncation_strategies": ["drop"], "batch_size": 16, "samples_per_shard": 32,
                    "max_length": 512, "attention": True},
    })
    ex = Extraction(cfg, tmp_path_factory.mktemp("attn-trained"))
    ex.run(show=False)
    return open_store(ex.store_path)


def test_known_answer_attention_to_the_image_under_blind_and_drop(trained, tmp_path):
    """Prediction site, hard (image) questions: the mass on the visual span is larger under original than
    under blind_black at layer 1, where presence and colour are read into the text (test_known_answers:
    truncation after L >= 1 no longer hurts them); under drop after L=1 it is exactly 0 at every later layer
    and the original's at layers <= 1. Through the registered metric (CIs, paired differences, figure)."""
    from gapcache.analyze import metrics
    from gapcache.analyze.metrics import Context
    from gapcache.analyze.pipeline import AnalysisParams
    from gapcache.analyze import stats

    ds = trained
    p = AnalysisParams(n_resamples=499, seed=0, ci_method="percentile")
    res = metrics.get("attention").compute(ds, p, Context())
    flow = res.arrays["attention_prediction"].sel(attention_quantity="visual_mass")  # (condition, sample, layer)
    hard = np.array([str(c) for c in ds.category.values]) == "hard"
    orig, black = (flow.sel(condition=c).values[hard] for c in ("original", "blind_black"))
    drop = flow.sel(condition="truncated_drop_L1").values[hard]
    layers = [int(x) for x in flow.layer.values]
    assert layers == [0, 1, 2, 3]  # the last hidden-state index (4) has no attention
    d = stats.mean_diff_ci(black[:, 1], orig[:, 1], n_resamples=499, method="percentile")
    assert d.high < 0, d
    assert (drop[:, 2:] == 0).all() and (orig[:, 2:] > 0).all()
    np.testing.assert_array_equal(drop[:, :2], orig[:, :2])
    # the metric's summary: per condition, per layer, CIs; paired differences from original; per head
    pred = res.summary["queries"]["prediction"]
    assert pred["layers"] == layers and set(pred["per_condition"]) == {"original", "blind_black", "truncated_drop_L1"}
    vm = pred["vs_original"]["truncated_drop_L1"]["visual_mass"]
    assert vm["estimate"][:2] == [0.0, 0.0] and all(h < 0 for h in vm["high"][2:])
    assert len(pred["per_head"]["visual_mass"]["estimate"]) == ds.sizes["attn_head"]
    summary = {"metrics": {"attention": res.summary}}
    assert metrics.get("attention").figure(summary, tmp_path, Context()) == "attention_flow.png"
    assert (tmp_path / "attention_flow.png").is_file()
    assert metrics.get("attention").rows(summary)


def test_the_metric_skips_a_store_without_summaries(fam):
    from gapcache.analyze import metrics
    from gapcache.analyze.metrics import Context
    from gapcache.analyze.pipeline import AnalysisParams

    if fam.family != "llava":
        pytest.skip("one family")
    ex = fam.sdpa
    ex.cfg.extract.attention = False
    try:
        ex.out = fam.tmp / "off"
        ex.store_path = ex.out / "store.zarr"
        ex.run(show=False)
    finally:
        ex.cfg.extract.attention = True
    ds = open_store(ex.store_path)
    assert not {"attn_mass", "attn_visual", "attn_query", "attn_head"} & set(ds.variables)
    result = metrics.as_result(metrics.get("attention").compute(ds, AnalysisParams(), Context()), "attention")
    assert "skipped" in result.summary


def test_dry_run_bytes_count_the_summaries_only_when_on():
    from gapcache.store import arrays

    sizes = {"site": 2, "layer": 5, "hidden": 32, "candidate": 3}
    off = arrays.bytes_per_sample(sizes, "bfloat16", {})
    on_sizes = {**sizes, "attn_query": len(att.QUERIES), "attn_head": 4, "attn_target": len(att.TARGETS),
                "attn_stat": len(att.STATS)}
    on = arrays.bytes_per_sample(on_sizes, "bfloat16", {})
    assert on - off == 3 * 5 * 4 * (4 + 5) * 4  # float32 (query, layer, head, target) + (query, layer, head, stat)
