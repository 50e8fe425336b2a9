"""Soft truncation and window masking on every family's tiny model: what each strategy puts at the visual
positions, the statistics it substitutes from (fitted on original, stored, shared by the tasks of an array),
and the state transplant (``drop`` at L equals layers > L run with the visual tokens physically removed).

The declared layers / positions and the text-site invariant of every one of these conditions (layers before
the intervention equal ``original`` bit for bit; a window [a, b] equals original through index a) are checked
by the conformance suite (tests/test_interventions.py), which runs every registered strategy and kind.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gapcache import conditions  # noqa: E402
from gapcache.extract import interventions  # noqa: E402
from gapcache.extract.hooks import hidden_of, replace_hidden  # noqa: E402
from gapcache.extract.models import get_adapter  # noqa: E402
from gapcache.store import open_store  # noqa: E402
from test_interventions import N_LAYERS, extraction, hooked_inputs, run  # noqa: E402,F401
from test_patching import clean_states  # noqa: E402

pytestmark = pytest.mark.integration

SOFT = [n for n, s in conditions.STRATEGIES.items() if s.soft]


def test_the_soft_strategies_are_registered():
    assert SOFT == ["norm_noise", "pca_noise", "mean", "shuffle"]
    assert conditions.strategies_of("window") == ("zero", "drop")
    assert conditions.fitted_layers([conditions.Condition("truncated", 0, "pca_noise"),
                                     conditions.Condition("truncated", 1, "mean"),
                                     conditions.Condition("truncated", -1, "shuffle")], 4) \
        == {"mean": (1, 2, 3), "pca": (1, 2, 3)}


def test_config_hash_and_records_unchanged_without_the_new_options():
    import hashlib
    import json

    from gapcache.config import HASH_OMITTED_AT_DEFAULT, load_config
    from gapcache.errors import ConfigError

    cfg = load_config({"model": {"id": "x"}, "extract": {"truncation_layers": [0], "conditions": ["truncated"]}})
    d = {k: v for k, v in cfg.to_dict().items() if k in ("model", "data", "extract")}
    for k in ("disk_bandwidth_mb_s", "forward_seconds_per_batch", "batch_size", *HASH_OMITTED_AT_DEFAULT):
        d["extract"].pop(k)
    assert cfg.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    soft = load_config({"model": {"id": "x"}, "extract": {"truncation_layers": [0], "soft_seed": 1}})
    assert soft.hash() != load_config({"model": {"id": "x"}, "extract": {"truncation_layers": [0]}}).hash()
    assert "window" not in conditions.condition_params(conditions.RunFacts(cfg.extract, None, (1, 0)))
    assert "soft" not in conditions.condition_params(conditions.RunFacts(cfg.extract, None, (1, 0)))["truncated"]
    assert conditions.Condition("truncated", 2, "zero").to_dict() == {
        "label": "truncated_zero_L2", "kind": "truncated", "truncation_layer": 2, "strategy": "zero"}
    for bad, match in (({"truncation_windows": [[2, 1]]}, "0 <= a <= b. Got \\[2, 1\\]"),
                       ({"window_strategies": ["mean"]}, "window_strategies.*\\['zero', 'drop'\\]. Got 'mean'"),
                       ({"conditions": ["window"]}, "truncation_windows.*non-empty when 'window' is run"),
                       ({"soft_pca_k": 0}, "soft_pca_k.*a positive int")):
        with pytest.raises(ConfigError, match=match):
            load_config({"model": {"id": "x"}, "extract": bad})
    with pytest.raises(ConfigError, match="truncation_windows.*\\[0, 3\\]. Got \\[1, 4\\]"):
        conditions.expand(["window"], n_layers=4, truncation_windows=[[1, 4]], window_strategies=["zero"])
    c = conditions.parse_label("window_drop_L24to47")
    assert (c.kind, c.strategy, c.window_start, c.window_end) == ("window", "drop", 24, 47)
    assert c.hook(48).layers == tuple(range(24, 48)) and c.invariant(48).equal_through == 24


def clean_visual(r, layers):
    """(layer -> (n tokens over every sample, hidden) float64) original's full visual span at each layer's input,
    gathered here by plain forwards one sample at a time (not by the code under test)."""
    return clean_states(r, "visual", layers)


def spans(P):
    return [slice(p.visual_start, p.visual_start + p.visual_length) for p in P]


@pytest.mark.parametrize("strategy", SOFT)
def test_soft_strategies_substitute_what_they_declare(run, strategy):
    r = run
    cond = r.cond[f"truncated_{strategy}_Lm1"]  # every layer's input intervened on
    batch = [0, 1] if r.family == "llava" else [0, 1, 2]
    P, inputs, seen = hooked_inputs(r, cond, batch)
    _, _, ref = hooked_inputs(r, r.cond["original"], batch)
    fitted, first = r.ex.fitted, {}
    assert torch.equal(seen[0, "before"][0], ref[0, "before"][0])  # layer 0 receives original's stream
    for j in range(N_LAYERS):
        before, after = seen[j, "before"][0], seen[j, "after"][0]
        for row, span in enumerate(spans(P)):
            h0, h1 = before[row, span].double(), after[row, span].double()
            assert not torch.equal(h0, h1), (strategy, j, row)
            if strategy == "norm_noise":
                assert torch.allclose(h1.norm(dim=-1), h0.norm(dim=-1), rtol=1e-5), (j, row)
            elif strategy == "mean":
                want = torch.as_tensor(fitted.values["mean"][fitted.layers[j]]).double()
                assert torch.equal(h1, want.expand_as(h1)), (j, row)
            elif strategy == "shuffle":  # a permutation of the states it received, no token left in place
                perm = [int(torch.nonzero((h0 == x).all(-1))[0]) for x in h1]
                assert sorted(perm) == list(range(len(perm))) and all(t != s for t, s in enumerate(perm)), perm
                if j == 0:  # ... of the clean states, the same permutation at every layer
                    assert torch.equal(h0, ref[0, "before"][0][row, span].double())
                    first[row] = perm
                assert perm == first[row]
            elif strategy == "pca_noise":
                k = fitted.layers[j]
                mean, basis = (torch.as_tensor(fitted.values[n][k]).double() for n in ("mean", "pca_basis"))
                d = h1 - mean
                assert torch.allclose(d - (d @ basis.T) @ basis, torch.zeros_like(d), atol=1e-4)  # in the top-k span
    # seeded per sample, not by the batch: sample 1 alone gets the same substitute as in the batch
    _, _, alone = hooked_inputs(r, cond, [1])
    s1 = spans(P)[1]
    assert torch.equal(alone[0, "after"][0][0, s1], seen[0, "after"][0][1, s1])


def test_fitted_statistics_are_original_s_over_the_run(run):
    r = run
    f = r.ex.ensure_fitted()
    layers = sorted(f.layers, key=f.layers.get)
    assert layers == list(range(N_LAYERS))  # every layer some mean / pca_noise condition acts on (L = -1)
    clean = clean_visual(r, layers)
    k = f.values["pca_basis"].shape[1]
    assert k == min(r.ex.cfg.extract.soft_pca_k, f.values["mean"].shape[1])
    for l in layers:
        x = clean[l]
        mu = x.mean(0)
        np.testing.assert_allclose(f.values["mean"][f.layers[l]], mu, rtol=1e-4, atol=1e-5)
        evals = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1][:k]
        np.testing.assert_allclose(f.values["pca_variance"][f.layers[l]], np.clip(evals, 0, None), rtol=1e-3,
                                   atol=1e-5 * evals[0])
        basis = f.values["pca_basis"][f.layers[l]].astype(np.float64)
        np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=1e-4)


def test_soft_conditions_into_a_store_fitted_once_and_read_by_every_task(run, tmp_path, monkeypatch):
    r = run
    extract = {"conditions": ["original", "truncated", "window"], "truncation_layers": [0],
               "truncation_strategies": ["mean", "pca_noise", "shuffle"], "truncation_windows": [[1, 2]],
               "window_strategies": ["drop"], "soft_seed": 3, "soft_pca_k": 4}
    first = extraction(r, tmp_path / "out", **extract)
    calls = []
    fit = first.fitted_statistics
    monkeypatch.setattr(first, "fitted_statistics", lambda: calls.append(1) or fit())
    first.run(show=False, task_index=0, n_tasks=2)
    assert calls == [1]  # the task that created the store fitted them
    second = extraction(r, tmp_path / "out", **extract)
    monkeypatch.setattr(second, "fitted_statistics", lambda: pytest.fail("a later task must read, not refit"))
    second.run(show=False, task_index=1, n_tasks=2)
    for name in ("mean", "pca_basis", "pca_variance"):
        assert np.array_equal(first.fitted.values[name], second.fitted.values[name])
    ds = open_store(first.store_path)
    assert [str(c) for c in ds.condition.values] == ["original", "truncated_mean_L0", "truncated_pca_noise_L0",
                                                     "truncated_shuffle_L0", "window_drop_L1to2"]
    assert list(ds.fit_layer.values) == [1, 2] and ds.fit_pca_basis.shape[1:] == (4, ds.sizes["hidden"])
    assert np.array_equal(ds.fit_mean.values, first.fitted.values["mean"])
    params = ds.attrs["condition_params"]
    assert params["truncated"]["soft"]["seed"] == 3 and params["truncated"]["soft"]["fitted"]["pca_k"] == 4
    assert params["window"]["windows"] == [[1, 2]]
    assert ds.attrs["conditions"][-1] == {"label": "window_drop_L1to2", "kind": "window", "truncation_layer": -999,
                                          "strategy": "drop", "window_start": 1, "window_end": 2}
    assert (ds.status.values == 1).all()  # every condition records what original records
    text, ref = ds.text_states.values[1:], ds.text_states.values[:1]
    assert np.array_equal(text[:3, :, :, :2], np.broadcast_to(ref[:, :, :, :2], text[:3, :, :, :2].shape))
    assert np.array_equal(text[3, :, :, :2], ref[0, :, :, :2]) and not np.array_equal(text[3, :, :, 2], ref[0, :, :, 2])
    assert np.isfinite(ds.gold_logprob.values).all()


# --------------------------------------------------------------------------- state transplant


def remove_positions(layers, keep, seq):
    """Pre-hooks that run ``layers`` on the positions ``keep`` only (the others physically removed), every
    position keeping its own rotary embedding / position ids; a hidden state already cut is passed on."""

    def cut(x, dims):
        for d in dims:
            if x.shape[d] == seq:
                x = x.index_select(d, keep.to(x.device))
        return x

    def hook(module, args, kwargs):
        h = hidden_of(args, kwargs)
        h = cut(h, (1,))
        kw = dict(kwargs)
        if kw.get("position_embeddings") is not None:
            kw["position_embeddings"] = tuple(cut(t, (-2,)) for t in kw["position_embeddings"])
        m = kw.get("attention_mask")
        if torch.is_tensor(m) and m.dim() == 4:
            kw["attention_mask"] = cut(m, (-2, -1))
        for name in ("position_ids", "cache_position"):
            if torch.is_tensor(kw.get(name)):
                kw[name] = cut(kw[name], (-1,))
        return replace_hidden(args, kw, h)

    return [m.register_forward_pre_hook(hook, with_kwargs=True, prepend=True) for m in layers]


@pytest.mark.parametrize("L", [0, 1])
def test_drop_at_L_is_the_state_transplant(run, L):
    """``drop`` at L: every text state equals a forward in which layers > L run on the sequence without the
    visual tokens (positions kept), to float tolerance, at every layer's input and in the logits."""
    r = run
    deepstack = get_adapter(r.family).deepstack_layers(r.model)
    if deepstack and L < max(deepstack):
        pytest.skip("deepstack adds visual features after layer <= L: removing the tokens is not defined there")
    cond = r.cond[f"truncated_drop_L{L}"]
    for i in range(2):  # one sample per forward: the visual span is the only thing removed
        p = r.ex.planned[i]
        inputs = r.ex.batch_inputs([i], cond)
        seq = inputs["input_ids"].shape[1]
        keep = torch.tensor([t for t in range(seq) if not p.visual_start <= t < p.visual_start + p.visual_length])
        norm = get_adapter(r.family).final_norm(r.model)
        modules = list(r.layers) + [norm]

        def probe_all(store):
            return [m.register_forward_pre_hook(lambda mod, a, k, j=j: store.__setitem__(j, hidden_of(a, k)[0].clone()),
                                                with_kwargs=True) for j, m in enumerate(modules)]

        dropped, moved = {}, {}
        with torch.inference_mode():
            with r.ex.intervention([p], cond, inputs, offsets=[0]):
                handles = probe_all(dropped)
                try:
                    a = r.model(**inputs, use_cache=False).logits[0]
                finally:
                    for h in handles:
                        h.remove()
            handles = remove_positions(r.layers[L + 1 :], keep, seq) + probe_all(moved)
            try:
                b = r.model(**inputs, use_cache=False).logits[0]
            finally:
                for h in handles:
                    h.remove()
        for j in range(L + 1, N_LAYERS + 1):
            assert moved[j].shape[0] == len(keep)  # the removed tokens really are gone from layer L+1 on
            torch.testing.assert_close(dropped[j][keep], moved[j], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[keep], b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the CPU tier, from the store alone


def test_soft_and_window_analysis_from_the_store(run, tmp_path):
    from gapcache.analyze import metrics, soft
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.scoring import forced_choice_correct, gold_candidate_index

    r = run
    if r.family != "llava":
        pytest.skip("the analysis reads the store only: one family is enough")
    extract = {"conditions": ["original", "truncated", "window"], "truncation_layers": [-1, 1],
               "truncation_strategies": ["zero", "norm_noise", "mean"], "truncation_windows": [[0, 1], [2, 2]],
               "window_strategies": ["zero", "drop"]}
    ex = extraction(r, tmp_path / "out", **extract)
    ex.run(show=False)
    ds = open_store(ex.store_path)
    p = AnalysisParams(metrics=("accuracy", "truncation", "soft_truncation", "window"), n_resamples=200)
    summary, results = analyze_store(ds, p)
    m = summary["metrics"]
    gold = ds.gold_logprob.values
    label = [str(c) for c in ds.condition.values]
    g = lambda c: gold[label.index(c)]  # noqa: E731
    st = m["soft_truncation"]
    assert st["reference"] == "zero" and st["layers"] == [-1, 1] and set(st["strategies"]) == {"zero", "norm_noise",
                                                                                                "mean"}
    for s in ("norm_noise", "mean"):
        want = [np.mean(g(f"truncated_zero_L{t}") - g(f"truncated_{s}_L{t}")) for t in ("m1", "1")]
        np.testing.assert_allclose(st["strategies"][s]["delta_minus_zero"]["estimate"], want, rtol=1e-5)
    assert "delta_minus_zero" not in st["strategies"]["zero"]
    correct = forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values,
                                    gold_candidate_index(ds.answer.values, ds.candidate.values))
    w = m["window"]["windows"]
    assert list(w) == ["window_zero_L0to1", "window_zero_L2to2", "window_drop_L0to1", "window_drop_L2to2"]
    for c, v in w.items():
        assert v["accuracy_minus_original"]["estimate"] == pytest.approx(
            np.mean(correct[label.index(c)] - correct[0]))
        assert v["mean_delta"]["estimate"] == pytest.approx(np.mean(g("original") - g(c)), rel=1e-5)
    assert "soft_delta_minus_zero" in results
    store_summary = {"metrics": m}
    assert soft.fig_soft(store_summary, tmp_path, metrics.Context()) == "soft_truncation.png"
    assert soft.fig_window(store_summary, tmp_path, metrics.Context()) == "window.png"
    assert (tmp_path / "soft_truncation.png").is_file() and soft.rows_window(store_summary)
