"""Single-layer patching on both channels (issue 13 items 3-5) on every family's tiny model: what each strategy
puts at the patched positions of layer l, the statistics it substitutes from (fitted on original per channel,
stored, recorded under condition_params), the swap's donor forward, and a run into a store.

The declared layers / positions and the text-site invariant of every patched condition (layers before l equal
``original`` bit for bit; the text channel touches exactly the question tokens) are checked by the conformance
suite (tests/test_interventions.py), which expands the patched kind over every strategy, channel and layer.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gapcache import conditions  # noqa: E402
from gapcache.extract.hooks import hidden_of  # noqa: E402
from gapcache.store import open_store  # noqa: E402
import test_interventions  # noqa: E402
from test_interventions import N_LAYERS, extraction, hooked_inputs, question_tokens  # noqa: E402

run = test_interventions.run  # the module fixture: every family's tiny model and its extraction

pytestmark = pytest.mark.integration

L = 1  # the patched layer of these tests (N_LAYERS = 3: layers 0 and 2 around it)


def seeded_noise(seed, strategy, sample, layer, shape):
    """conditions.SEED_RULE, written out here: the noise the rule says sample ``sample`` gets at ``layer``."""
    state = np.random.SeedSequence([seed, zlib.crc32(strategy.encode()), sample, layer + 1]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def positions_of(r, channel, p):
    if channel == "visual":
        return sorted(range(p.visual_start, p.visual_start + p.visual_length))
    return sorted(question_tokens(p, r.processor.tokenizer))


def clean_states(r, channel, layers):
    """layer -> (tokens over every sample, hidden) float64: original's states of ``channel`` at each layer's input,
    by plain forwards one sample at a time (not by the code under test)."""
    out = {l: [] for l in layers}
    for i, p in enumerate(r.ex.planned):
        inputs = r.ex.batch_inputs([i], r.cond["original"])
        seen = {}
        handles = [r.layers[l].register_forward_pre_hook(
            lambda m, a, k, l=l: seen.__setitem__(l, hidden_of(a, k)[0].detach().clone()), with_kwargs=True)
            for l in layers]
        try:
            with torch.inference_mode():
                r.model(**inputs, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            out[l].append(seen[l][positions_of(r, channel, p)].double())
    return {l: torch.cat(v).numpy() for l, v in out.items()}


@pytest.mark.parametrize("channel", ["visual", "text"])
def test_fitted_mean_and_sigma_are_original_s_over_the_run(run, channel):
    r = run
    f = r.ex.ensure_fitted()
    assert sorted(f.layers) == list(range(N_LAYERS))
    clean = clean_states(r, channel, range(N_LAYERS))
    pos = conditions.CHANNELS[channel]
    for l in range(N_LAYERS):
        x = clean[l]
        np.testing.assert_allclose(f.values[conditions.fit_key("mean", pos)][f.layers[l]], x.mean(0), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(f.values[conditions.fit_key("sigma", pos)][f.layers[l]], x.std(), rtol=1e-5)


@pytest.mark.parametrize("channel, strategy", [(c, s) for c in conditions.CHANNELS for s in conditions.strategies_of(
    "patched") if c in conditions.STRATEGIES[s].channels])
def test_patched_positions_hold_what_the_strategy_says(run, channel, strategy):
    r = run
    cond = r.cond[f"patched_{channel}_{strategy}_L{L}"]
    batch = [0, 1] if r.family == "llava" else [0, 1, 2]  # Qwen: mixed span lengths, padded rows
    P, inputs, seen = hooked_inputs(r, cond, batch)
    _, _, ref = hooked_inputs(r, r.cond["original"], batch)
    for j in range(L + 1):  # every layer up to l receives original's stream
        assert torch.equal(seen[j, "before"][0], ref[j, "before"][0]), (cond.label, j)
    f, pos = r.ex.fitted, conditions.CHANNELS[channel]
    if strategy == "swap":
        _, _, donor = hooked_inputs(r, r.cond["blind_randomimage"], batch)
    before, after = seen[L, "before"][0], seen[L, "after"][0]
    for row, p in enumerate(P):
        t = positions_of(r, channel, p)
        h0, h1 = before[row, t], after[row, t]
        assert not torch.equal(h0, h1), (cond.label, row)
        if strategy == "zero":
            assert torch.equal(h1, torch.zeros_like(h1))
        elif strategy == "norm_noise":
            torch.testing.assert_close(h1.double().norm(dim=-1), h0.double().norm(dim=-1), rtol=1e-5, atol=0)
        elif strategy == "mean":
            want = torch.as_tensor(f.values[conditions.fit_key("mean", pos)][f.layers[L]])
            assert torch.equal(h1, want.expand_as(h1))
        elif strategy == "gaussian":
            sigma = float(f.values[conditions.fit_key("sigma", pos)][f.layers[L]])
            z = seeded_noise(r.ex.cfg.extract.soft_seed, "gaussian", p.index, L, h0.shape)
            torch.testing.assert_close(h1, h0 + sigma * z, rtol=0, atol=1e-6)
        elif strategy == "swap":  # the donor image's states at layer l, under this prompt (same batch layout)
            assert torch.equal(h1, donor[L, "before"][0][row, t])
    # seeded per sample, not by the batch: sample 1 alone gets the same substitute
    _, _, alone = hooked_inputs(r, cond, [1])
    t1 = positions_of(r, channel, P[1])
    torch.testing.assert_close(alone[L, "after"][0][0, t1], after[1, t1], rtol=1e-5, atol=1e-5)


def test_swap_donor_states_cost_one_partial_forward_per_batch(run):
    """One donor forward per (batch, layer), stopped at layer l (the layers from l on never run), shared by the
    swap condition's candidate, gold-answer and generation forwards of that batch."""
    r = run
    r.ex.__dict__.pop("_donor_cache", None)
    calls = []
    handles = [m.register_forward_hook(lambda m, a, out, j=j: calls.append(j)) for j, m in enumerate(r.layers)]
    try:
        states = r.ex.donor_states([0, 1], L)
        again = r.ex.donor_states([0, 1], L)
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(L)) and again is states  # layers 0..l-1 ran once; layer l and later never ran
    assert [s.shape[0] for s in states] == [p.visual_length for p in r.ex.planned[:2]]


def test_patching_into_a_store_records_what_original_records(run, tmp_path):
    r = run
    extract = {"conditions": ["original", "patched"], "patch_layers": [0, 2], "patch_channels": ["visual", "text"],
               "patch_strategies": ["gaussian", "swap", "mean"], "soft_seed": 5,
               "generate": {"enabled": True, "max_new_tokens": 2}}
    first = extraction(r, tmp_path / "out", **extract)
    first.run(show=False, task_index=0, n_tasks=2)
    second = extraction(r, tmp_path / "out", **extract)  # the other task of the array reads the statistics
    second.run(show=False, task_index=1, n_tasks=2)
    ds = open_store(first.store_path)
    labels = [str(c) for c in ds.condition.values]
    assert labels == ["original", "patched_visual_gaussian_L0", "patched_visual_gaussian_L2",
                      "patched_visual_swap_L0", "patched_visual_swap_L2", "patched_visual_mean_L0",
                      "patched_visual_mean_L2", "patched_text_gaussian_L0", "patched_text_gaussian_L2",
                      "patched_text_mean_L0", "patched_text_mean_L2"]
    assert (ds.status.values == 1).all() and np.isfinite(ds.gold_logprob.values).all()
    assert np.isfinite(ds.candidate_logprob.values[:, ds.candidate_mask.values]).all()
    assert all(isinstance(g, str) for g in ds.generation.values.ravel())
    p = ds.attrs["condition_params"]["patched"]
    assert list(ds.fit_layer.values) == [0, 2]
    for ch, name in (("visual", "fit_sigma"), ("text", "fit_question_sigma")):
        assert p["sigma"][ch] == {str(l): float(ds[name].values[k]) for k, l in enumerate([0, 2])}
    assert np.array_equal(ds.fit_question_mean.values, first.fitted.values["question_mean"])
    assert p["swap"]["donor"] == [int(d) for d in ds.donor.values] and p["seed"] == 5
    assert ds.attrs["conditions"][3] == {"label": "patched_visual_swap_L0", "kind": "patched",
                                         "truncation_layer": conditions.NO_LAYER, "strategy": "swap",
                                         "channel": "visual", "patch_layer": 0}
    text = ds.text_states.values  # (condition, sample, site, layer, hidden)
    for k, label in enumerate(labels[1:], start=1):
        c = conditions.parse_label(label)
        same = c.invariant(N_LAYERS).equal_through
        assert np.array_equal(text[k, :, :, : same + 1], text[0, :, :, : same + 1]), label
        assert not np.array_equal(text[k, :, :, same + 1], text[0, :, :, same + 1]), label


# --------------------------------------------------------------------------- deepstack (Qwen3-VL)


def deepstack_run(run):
    """The run, for a family whose model adds deepstack features (the tiny Qwen3-VL ones: one level, vision block
    0 -> added after decoder layer 0); the other families skip."""
    from gapcache.extract.models import get_adapter

    layers = get_adapter(run.family).deepstack_layers(run.model)
    if not layers:
        pytest.skip(f"{run.family} has no deepstack")
    assert layers == (0,)
    return run


def layer_outputs(r, cond, batch):
    """hooked_inputs, plus each decoder layer's own output (before any deepstack add) and the deepstack features
    of the batch (batch order of the visual positions)."""
    outs = {}
    handles = [m.register_forward_hook(lambda m, a, o, j=j: outs.__setitem__(j, (o[0] if isinstance(o, tuple) else o)
                                                                                .detach().clone()))
               for j, m in enumerate(r.layers)]
    try:
        P, inputs, seen = hooked_inputs(r, cond, batch)
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        feats = r.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    added = torch.cat(list(feats.deepstack_features[0]), 0)  # level 0: (visual tokens of the batch, hidden)
    return P, seen, outs, added


@pytest.mark.parametrize("l", range(N_LAYERS - 1))
def test_a_visual_patch_is_undone_by_the_deepstack_add_after_its_layer_only(run, l):
    """Known answer: after a visual zero patch at layer l the visual positions entering l + 1 hold layer l's
    output plus, when a deepstack add follows l (l = 0 on the tiny Qwen3-VL), exactly this image's deepstack
    features. Without an add (l = 1) they hold layer l's output alone, which is the same for two different images
    of one size (the zeros and the text before the image are all it reads); with it they differ by the images'
    features. conditions.deepstack_readds says which: (0,) at l = 0, () at l = 1."""
    r = deepstack_run(run)
    cond = r.cond[f"patched_visual_zero_L{l}"]
    batch = [0, 2]  # two 64x64 images (the odd samples are wider): the same visual positions and grid
    P, seen, outs, added = layer_outputs(r, cond, batch)
    assert P[0].visual_length == P[1].visual_length and P[0].visual_start == P[1].visual_start
    vis = [list(range(p.visual_start, p.visual_start + p.visual_length)) for p in P]
    rows = [added[: P[0].visual_length], added[P[0].visual_length:]]
    assert all(f.abs().max() > 0 for f in rows) and not torch.equal(rows[0], rows[1])
    entering = seen[l + 1, "before"][0]
    readds = conditions.deepstack_readds(cond, N_LAYERS, (0,))
    assert readds == ((0,) if l == 0 else ())
    for row, t in enumerate(vis):
        assert torch.equal(seen[l, "after"][0][row, t], torch.zeros_like(seen[l, "after"][0][row, t]))  # the patch
        want = outs[l][row, t] + rows[row] if readds else outs[l][row, t]
        assert torch.equal(entering[row, t], want), (l, row)
    image_free = [entering[row, t] - (rows[row] if readds else 0) for row, t in enumerate(vis)]
    torch.testing.assert_close(image_free[0], image_free[1], rtol=0, atol=1e-5)  # the patch removed the image
    if readds:  # ... and the deepstack add brought it back at layer l + 1
        assert not torch.allclose(entering[0, vis[0]], entering[1, vis[1]], atol=1e-3)


def test_the_store_records_deepstack_layers_and_the_summary_flags_what_they_follow(run, tmp_path):
    """The store's deepstack_layers attribute is the adapter's, and the CPU tier flags from it alone the visual
    patches (l = 0) and windows ([0, 0]) that a deepstack add follows: in the summary and the report rows,
    numbers kept."""
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.report import key_numbers
    from gapcache.extract.models import get_adapter

    r = run
    ex = extraction(r, tmp_path / "out", conditions=["original", "window", "patched"], truncation_windows=[[0, 0], [1, 2]],
                    window_strategies=["zero", "drop"], patch_layers=list(range(N_LAYERS)),
                    patch_channels=["visual", "text"], patch_strategies=["zero", "swap"])
    ex.run(show=False)
    ds = open_store(ex.store_path)
    deepstack = list(get_adapter(r.family).deepstack_layers(r.model))
    assert ds.attrs["deepstack_layers"] == deepstack == ([0] if r.family.startswith("qwen3_vl") else [])
    summary, _ = analyze_store(ds, AnalysisParams(metrics=("patching", "swap", "window"), n_resamples=19))
    m, w = summary["metrics"]["patching"], summary["metrics"]["window"]["windows"]
    assert m["deepstack"]["layers"] == deepstack
    flagged = {"visual": {"zero": {"0": [0]}, "swap": {"0": [0]}}} if deepstack else {}
    assert m["deepstack"]["readded"] == flagged
    assert m["curves"]["visual"]["zero"].get("deepstack_readded") == ([0] if deepstack else None)
    assert len(m["curves"]["visual"]["zero"]["delta"]["estimate"]) == N_LAYERS  # every layer's number kept
    assert w["window_zero_L0to0"].get("deepstack_readded") == ([0] if deepstack else None)
    assert "deepstack_readded" not in w["window_zero_L1to2"] and "deepstack_readded" not in w["window_drop_L0to0"]
    rows = dict(key_numbers(summary))
    assert ("deepstack re-adds the image (visual patches)" in rows) == bool(deepstack)
    assert summary["metrics"]["swap"].get("deepstack_readded") == ([0] if deepstack else None)
