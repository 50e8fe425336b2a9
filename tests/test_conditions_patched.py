"""The ``patched`` condition kind (single-layer patching, two channels; issue 13 items 3-5) in the registry:
labels and their parse, expansion from the config, validation, to_dict / from_dict, hooks, invariants,
the recorded parameters and their merge. Torch-free (the hooks themselves: tests/test_interventions.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gapcache import conditions
from gapcache.conditions import NO_LAYER, PATCHING, Condition, RunFacts
from gapcache.config import DEMO, load_config
from gapcache.errors import ConfigError, UnknownNameError


def cfg(**extract):
    return load_config({"model": {"id": "x"}, "extract": {"conditions": ["original", "patched"], **extract}})


def test_labels_expansion_and_parse():
    e = cfg(patch_layers=[0, 3], patch_channels=["visual", "text"], patch_strategies=["zero", "swap"]).extract
    conds = conditions.expand_config(e, 4)
    assert [c.label for c in conds] == ["original", "patched_visual_zero_L0", "patched_visual_zero_L3",
                                        "patched_visual_swap_L0", "patched_visual_swap_L3",
                                        "patched_text_zero_L0", "patched_text_zero_L3"]  # swap: visual only
    for c in conds:
        assert conditions.parse_label(c.label) == c
    c = conditions.parse_label("patched_text_gaussian_L12")
    assert (c.kind, c.channel, c.strategy, c.patch_layer, c.truncation_layer) == ("patched", "text", "gaussian", 12,
                                                                                  NO_LAYER)
    assert conditions.parse_label("patched_visual_norm_noise_L3").strategy == "norm_noise"
    for bad in ("patched_audio_zero_L1", "patched_visual_zero_Lm1", "patched_visual_zero"):
        with pytest.raises(UnknownNameError, match="condition label"):
            conditions.parse_label(bad)
    assert c.group == PATCHING and conditions.kinds_in_group(PATCHING) == ("patched",)
    assert conditions.label_in_group("patched_visual_swap_L3", PATCHING)
    assert not conditions.label_in_group("truncated_zero_L3", PATCHING)
    assert not c.records_visual and c.image_kind == "original"


def test_to_dict_records_the_new_fields_only_when_set():
    c = Condition("patched", strategy="swap", channel="visual", patch_layer=3)
    assert c.to_dict() == {"label": "patched_visual_swap_L3", "kind": "patched", "truncation_layer": NO_LAYER,
                           "strategy": "swap", "channel": "visual", "patch_layer": 3}
    assert Condition.from_dict(c.to_dict()) == c
    assert Condition("truncated", 2, "zero").to_dict() == {"label": "truncated_zero_L2", "kind": "truncated",
                                                           "truncation_layer": 2, "strategy": "zero"}
    assert Condition.from_dict({"label": "original", "kind": "original", "truncation_layer": NO_LAYER,
                                "strategy": ""}) == Condition("original")


def test_hooks_and_invariants():
    v = Condition("patched", strategy="mean", channel="visual", patch_layer=2)
    t = Condition("patched", strategy="mean", channel="text", patch_layer=2)
    assert v.hook(4) == conditions.Hook("mean", (2,), "visual")
    assert t.hook(4) == conditions.Hook("mean", (2,), "question")
    # visual: index l is original's at the text sites (only visual positions change there); text: the question
    # tokens (the instruction site among them) change at index l already
    assert (v.invariant(4).equal_through, v.invariant(4).later_differ) == (2, True)
    assert (t.invariant(4).equal_through, t.invariant(4).later_differ) == (1, True)
    assert Condition("patched", strategy="zero", channel="text", patch_layer=0).invariant(4).equal_through == -1
    with pytest.raises(ConfigError, match="swap.*'visual'.*Got channel 'text'"):
        Condition("patched", strategy="swap", channel="text", patch_layer=0).hook(4)
    with pytest.raises(UnknownNameError, match="patching channel"):
        Condition("patched", strategy="zero", channel="audio", patch_layer=0).hook(4)
    assert conditions.fitted_layers([v, t, Condition("patched", strategy="gaussian", channel="text", patch_layer=1),
                                     Condition("truncated", 2, "mean")], 4) \
        == {"mean": (2, 3), "question_mean": (2,), "question_sigma": (1,)}
    assert conditions.strategies_of("patched") == ("zero", "norm_noise", "mean", "gaussian", "swap")
    assert conditions.strategies_of("truncated") == ("zero", "drop", "norm_noise", "pca_noise", "mean", "shuffle")
    assert conditions.strategies_of("window") == ("zero", "drop")


def test_deepstack_readds_follow_the_last_hooked_layer_only():
    """conditions.DEEPSTACK_RULE: the hooks act on layer inputs, so a deepstack add after decoder layer d (Qwen3-VL)
    is undone by a hook on layer d + 1 and survives one after the last hooked layer; only state-changing hooks on
    the visual positions count, and an add after the last decoder layer reaches no later layer."""
    def readds(label, n_layers=36, deepstack=(0, 1, 2)):
        return conditions.deepstack_readds(conditions.parse_label(label), n_layers, deepstack)

    for s in ("zero", "gaussian", "norm_noise", "mean", "swap"):  # visual patching at l: every add at d >= l
        assert [readds(f"patched_visual_{s}_L{l}") for l in (0, 1, 2, 3, 35)] == [(0, 1, 2), (1, 2), (2,), (), ()]
    for s in ("zero", "gaussian", "norm_noise", "mean"):  # the question's tokens: no add there
        assert readds(f"patched_text_{s}_L0") == ()
    assert readds("window_zero_L0to1") == (1, 2) and readds("window_zero_L1to4") == ()
    assert readds("window_drop_L0to1") == ()  # drop masks keys; the visual states are untouched anyway
    for label in ("truncated_zero_Lm1", "truncated_mean_L0", "truncated_shuffle_L1", "truncated_drop_L2",
                  "original", "blind_black"):  # truncation hooks every layer up to the last: each add undone
        assert readds(label) == ()
    assert readds("patched_visual_zero_L0", deepstack=()) == ()  # a family without deepstack
    # the tiny Qwen3-VL: one level, added after decoder layer 0 of 3
    assert [readds(f"patched_visual_zero_L{l}", 3, (0,)) for l in range(3)] == [(0,), (), ()]
    # an add after the last decoder layer (d = n_layers - 1) only reaches the recorded index n_layers
    assert readds("patched_visual_zero_L1", 3, (1, 2)) == (1,)
    assert readds("patched_visual_zero_L2", 3, (1, 2)) == ()
    assert "l <= max(deepstack_layers)" in conditions.DEEPSTACK_RULE


@pytest.mark.parametrize("extract, match", [
    ({"patch_layers": []}, "patch_layers.*non-empty when 'patched' is run"),
    ({"patch_layers": [-1]}, r"patch_layers.*ints >= 0\). Got -1"),
    ({"patch_layers": [1, 1]}, "patch_layers.*without repeats"),
    ({"patch_layers": [1], "patch_channels": ["audio"]}, r"patch_channels.*\['visual', 'text'\]. Got 'audio'"),
    ({"patch_layers": [1], "patch_strategies": ["drop"]}, r"patch_strategies.*\['zero', 'norm_noise', 'mean', "
                                                          r"'gaussian', 'swap'\]. Got 'drop'"),
    ({"patch_layers": [1], "patch_channels": ["text"]}, "'swap' acts on the visual channel only.*Add 'visual' "
                                                        "to patch_channels or remove 'swap'"),
    ({"patch_layers": [1], "patch_channels": []}, "patch_channels.*non-empty"),
    ({"patch_layers": 3}, "patch_layers.*a list. Got 3"),
])
def test_validation_in_the_one_place(extract, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**extract)


def test_validation_of_unused_options_and_layer_range():
    load_config({"model": {"id": "x"}, "extract": {"patch_layers": []}})  # not run: no layers needed
    with pytest.raises(ConfigError, match=r"patch_strategies.*Got 'drop'"):  # but the names are still checked
        load_config({"model": {"id": "x"}, "extract": {"patch_strategies": ["drop"]}})
    e = cfg(patch_layers=[4], patch_channels=["text"], patch_strategies=["zero"]).extract
    with pytest.raises(ConfigError, match=r"patch_layers.*\[0, 3\]. Got 4"):
        conditions.expand_config(e, 4)
    assert [c.label for c in conditions.expand_config(e, 5)] == ["original", "patched_text_zero_L4"]


def test_config_hash_unchanged_without_patching():
    from gapcache.config import HASH_OMITTED_AT_DEFAULT

    assert {"patch_layers", "patch_channels", "patch_strategies"} <= set(HASH_OMITTED_AT_DEFAULT)
    assert load_config(DEMO).hash() == "6626e1676c66d8f9"
    assert cfg(patch_layers=[1]).hash() != cfg(patch_layers=[2]).hash()
    e = load_config(DEMO).extract
    assert "patched" not in conditions.condition_params(RunFacts(e, (1.0, 2.0, 3.0), (1, 0)))


def fitted(layers, sigma, question_sigma):
    """A stand-in of extract.interventions.Fitted (the two attributes condition_params reads)."""
    return SimpleNamespace(layers={l: k for k, l in enumerate(layers)},
                           values={"sigma": np.array(sigma, np.float32),
                                   "question_sigma": np.array(question_sigma, np.float32)})


def test_condition_params_record_sigma_seeds_and_donors():
    e = cfg(patch_layers=[2, 0], soft_seed=7, seed=3).extract
    f = fitted([0, 1, 2], [0.5, 0.25, 1.5], [2.0, 3.0, 0.125])
    p = conditions.condition_params(RunFacts(e, None, (2, 0, 1), f))["patched"]
    assert p["layers"] == [2, 0] and p["channels"] == ["visual", "text"]
    assert p["strategies"] == ["zero", "gaussian", "norm_noise", "mean", "swap"]
    assert p["sigma"] == {"visual": {"2": 1.5, "0": 0.5}, "text": {"2": 0.125, "0": 2.0}}
    assert p["seed"] == 7 and p["seed_rule"] == conditions.SEED_RULE
    assert p["swap"]["donor"] == [2, 0, 1] and p["swap"]["seed"] == 3
    assert p["fitted"]["statistics"] == ["mean", "question_mean", "question_sigma", "sigma"]
    assert set(p["rules"]) == set(p["strategies"]) and set(p["positions"]) == {"visual", "text"}
    # without noise, fits or swap, none of their entries
    q = conditions.condition_params(RunFacts(cfg(patch_layers=[1], patch_strategies=["zero"]).extract, None,
                                             (1, 0)))["patched"]
    assert not {"seed", "sigma", "swap", "fitted"} & set(q)
    t = conditions.condition_params(RunFacts(cfg(patch_layers=[1], patch_channels=["text"],
                                                 patch_strategies=["gaussian"]).extract, None, (1, 0)))["patched"]
    assert t["sigma"] is None and "swap" not in t  # sigma unknown before the pre-pass


def test_merge_params_unions_remaps_donors_and_keeps_each_sigma():
    entry = conditions.kind("patched")
    a = {"layers": [0, 2], "channels": ["visual"], "strategies": ["swap", "gaussian"],
         "sigma": {"visual": {"0": 1.0, "2": 2.0}}, "swap": {"donor": [1, 0], "seed": 0}}
    b = {"layers": [1], "channels": ["visual", "text"], "strategies": ["gaussian"],
         "sigma": {"visual": {"1": 4.0}, "text": {"1": 0.5}}}
    out = entry.merge_params("patched", [("a.zarr", a), ("b.zarr", b)], np.array([1, 0, 3, 2]))
    assert out["layers"] == [0, 1, 2] and out["channels"] == ["visual", "text"]
    assert out["strategies"] == ["swap", "gaussian"]
    assert out["swap"]["donor"] == [1, 0, 3, 2] and a["swap"]["donor"] == [1, 0]  # inputs untouched
    assert out["sigma"] == a["sigma"]
    assert out["sigma_of_inputs"] == [{"store": "a.zarr", "sigma": a["sigma"]}, {"store": "b.zarr", "sigma": b["sigma"]}]
    same = entry.merge_params("patched", [("a.zarr", a), ("c.zarr", dict(a))], None)
    assert same == a and "sigma_of_inputs" not in same


def test_dry_run_counts_the_forward_passes_of_each_family():
    from gapcache.extract.estimate import forward_passes, suite_passes

    swap = Condition("patched", strategy="swap", channel="visual", patch_layer=12)
    zero = Condition("patched", strategy="zero", channel="text", patch_layer=12)
    assert forward_passes(zero, 48) == (1.0, 1.0)
    assert forward_passes(swap, 48) == (2.0, 1.25)  # + one donor forward stopped at layer 12 of 48
    assert forward_passes(swap, 48, extra=0.5, generate=True) == (5.5, 2.5 + 3 * 0.25)
    e = cfg(patch_layers=[0, 24], patch_strategies=["zero", "mean", "swap"]).extract
    table = suite_passes(conditions.expand_config(e, 48), 48)
    assert table == {"original": {"conditions": 1, "passes": 1.0, "equivalents": 1.0},
                     "patched": {"conditions": 10, "passes": 12.0, "equivalents": 10.5},
                     "fit pre-pass": {"conditions": 0, "passes": 1.0, "equivalents": 1.0}}
