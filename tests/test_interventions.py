"""Conformance of the condition / intervention registry, on every family's tiny model.

For every registered condition kind, expanded over every strategy it accepts and every layer of a
3-layer tiny model (random weights, one per family in ``ADAPTERS``):

1. the hook touches exactly what the registry declares: at the input of its declared layers only,
   at its declared positions only (``states`` strategies), or only (outside query, declared key)
   pairs of the attention mask (``attention`` strategies);
2. the recorded text-site states satisfy the declared invariant against ``original`` (equal at
   indices <= ``equal_through``, different at every later index), and a condition without a hook
   that feeds the original image reproduces ``original`` exactly;
3. a test-only strategy added to the registry (monkeypatch) validates, expands, labels, installs
   and runs into a store with no other edit.

Plus the registry's own tables: every strategy has a hook class, every image a feeder, every
position kind a finder; existing labels and ``condition_params`` are pinned byte for byte.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")


from gapcache import conditions  # noqa: E402
from gapcache.config import ModelConfig, load_config  # noqa: E402
from gapcache.errors import ConfigError, UnknownNameError  # noqa: E402
from gapcache.extract import data as data_mod  # noqa: E402
from gapcache.extract import interventions  # noqa: E402
from gapcache.extract.hooks import Capture, hidden_of, replace_hidden  # noqa: E402
from gapcache.extract.models import ADAPTERS, get_adapter  # noqa: E402
from gapcache.extract.runner import Extraction  # noqa: E402
from gapcache.extract.tiny import build_tiny_checkpoint  # noqa: E402
from gapcache.store import open_store  # noqa: E402
from helpers import allowed_keys, ragged_samples  # noqa: E402

pytestmark = pytest.mark.integration

FAMILIES = tuple(ADAPTERS)
N_LAYERS = 3
N_SAMPLES = 4
WIDE = (96, 64)  # odd samples: ragged Qwen visual spans
ATTN = {"llava": "eager", "qwen2_vl": "sdpa", "qwen2_5_vl": "eager", "qwen3_vl": "sdpa", "qwen3_vl_moe": "eager"}

#: per condition kind with options: the options that cover it on a model of N_LAYERS layers, given every
#: strategy it accepts. A new kind with options needs its entry here (test_every_kind_is_covered).
KIND_OPTIONS = {
    "truncated": lambda strategies: {"truncation_layers": list(range(-1, N_LAYERS)),
                                     "truncation_strategies": list(strategies)},
    "window": lambda strategies: {"truncation_windows": [[0, 0], [1, 2]], "window_strategies": list(strategies)},
    "patched": lambda strategies: {"patch_layers": list(range(N_LAYERS)), "patch_channels": list(conditions.CHANNELS),
                                   "patch_strategies": list(strategies)},
}


def question_tokens(p, tok) -> set:
    """The prompt positions whose decoded text, whitespace removed, spells the question (whitespace removed): the
    last such run of tokens, whitespace-only tokens at its ends left out (not read from the site planner)."""
    target = "".join(p.sample.question.split())
    pieces = ["".join(tok.decode([t]).split()) for t in p.prompt_ids]
    found = None
    for a in range(len(pieces)):
        if not pieces[a] or not target.startswith(pieces[a]):
            continue
        text, b = "", a
        while b < len(pieces) and len(text) < len(target) and target.startswith(text + pieces[b]):
            text, b = text + pieces[b], b + 1
        if text == target:
            found = (a, b)
    assert found is not None, (p.sample.question, pieces)
    return set(range(*found))


#: the positions each position kind names, computed here from the planned sample and its tokenizer (not by the
#: code under test)
EXPECTED_POSITIONS = {"visual": lambda p, tok: set(range(p.visual_start, p.visual_start + p.visual_length)),
                      "question": question_tokens}


def conformance_options() -> dict:
    opts = {}
    for name, entry in conditions.KINDS.items():
        if entry.options and name in KIND_OPTIONS:
            opts.update(KIND_OPTIONS[name](conditions.strategies_of(name)))
    return opts


def conformance_conditions() -> list:
    ns = SimpleNamespace(conditions=list(conditions.KINDS), **conformance_options())
    return conditions.expand_config(ns, N_LAYERS)


LABELS = [c.label for c in conformance_conditions()]
HOOKED = [c.label for c in conformance_conditions() if c.hook(N_LAYERS) is not None]


# --------------------------------------------------------------------------- the registry's tables


def test_every_kind_is_covered_and_every_name_has_its_implementation():
    assert set(KIND_OPTIONS) == {n for n, k in conditions.KINDS.items() if k.options}
    assert set(interventions.IMPLEMENTATIONS) == set(conditions.STRATEGIES)
    assert set(data_mod.IMAGE_FEEDS) == set(conditions.IMAGES)
    assert set(interventions.POSITIONS) == set(conditions.POSITIONS) == set(EXPECTED_POSITIONS)
    for entry in conditions.KINDS.values():
        assert entry.image in conditions.IMAGES and entry.group in conditions.GROUPS
    for s in conditions.STRATEGIES.values():
        assert s.acts_on in conditions.ACTS_ON and all(k in conditions.KINDS for k in s.kinds)
    # every strategy and every kind appears in the conformance run
    conds = conformance_conditions()
    assert {c.kind for c in conds} == set(conditions.KINDS)
    assert {c.strategy for c in conds if c.strategy} == set(conditions.STRATEGIES)


def test_labels_are_byte_identical_and_parse_back():
    labels = [c.label for c in conditions.expand(
        ["original", "blind_black", "blind_mean", "blind_randomimage", "truncated"], [-1, 0, 3], ["zero", "drop"])]
    assert labels == ["original", "blind_black", "blind_mean", "blind_randomimage",
                      "truncated_zero_Lm1", "truncated_zero_L0", "truncated_zero_L3",
                      "truncated_drop_Lm1", "truncated_drop_L0", "truncated_drop_L3"]
    for c in conformance_conditions():
        assert conditions.parse_label(c.label) == c
    assert conditions.parse_label("truncated_norm_noise_L12") == conditions.Condition("truncated", 12, "norm_noise")
    with pytest.raises(UnknownNameError, match="condition label"):
        conditions.parse_label("vs_original")


def test_groups_replace_name_checks():
    assert conditions.kinds_in_group(conditions.TRUNCATION) == ("truncated",)
    assert conditions.in_group(["original", "truncated", "blind_black", "from_the_future"], conditions.TRUNCATION) \
        == [False, True, False, False]
    assert conditions.label_in_group("truncated_drop_Lm1", conditions.TRUNCATION)
    assert not conditions.label_in_group("blind_black", conditions.TRUNCATION)
    assert not conditions.label_in_group("vs_original", conditions.TRUNCATION)
    with pytest.raises(UnknownNameError, match="condition group"):
        conditions.kinds_in_group("truncations")


def test_declared_hooks_and_invariants_of_truncation():
    c = conditions.Condition("truncated", 0, "drop")
    assert c.hook(4) == conditions.Hook("drop", (1, 2, 3), "visual")
    assert conditions.Condition("truncated", -1, "zero").hook(4).layers == (0, 1, 2, 3)
    assert conditions.Condition("truncated", 3, "zero").hook(4) is None  # nothing after the last layer
    assert c.invariant(4) == conditions.Invariant(1, True, c.invariant(4).description)
    assert conditions.Condition("truncated", 3, "zero").invariant(4).later_differ is False
    assert not c.records_visual and c.image_kind == "original" and c.group == conditions.TRUNCATION
    blind = conditions.Condition("blind_randomimage")
    assert blind.hook(4) is None and blind.records_visual and blind.image_kind == "randomimage"


def test_condition_params_are_what_the_store_recorded_before_the_registry():
    e = load_config({"model": {"id": "x"}, "extract": {"truncation_layers": [-1, 2], "seed": 5}}).extract
    got = conditions.condition_params(conditions.RunFacts(e, (1.5, 2.0, 3.25), (1, 0, 3, 2)))
    want = {  # the literal store_attrs() wrote by hand before the registry
        "blind_mean": {"mean_rgb": [1.5, 2.0, 3.25]},
        "blind_randomimage": {"seed": 5, "donor": [1, 0, 3, 2], "resize": "PIL bicubic to the original's size"},
        "truncated": {"layers": [-1, 2], "strategies": ["zero", "drop"],
                      "convention": "input of every decoder layer with index > L is intervened on"},
    }
    assert json.dumps(got) == json.dumps(want)  # keys in the same order too
    assert conditions.condition_params(conditions.RunFacts(e, None, (1, 0)))["blind_mean"] == {"mean_rgb": None}


def test_config_validation_comes_from_the_registry():
    base = {"model": {"id": "x"}}
    assert load_config(base).extract.conditions == ["original", "blind_black", "blind_mean", "blind_randomimage"]
    with pytest.raises(ConfigError, match=r"truncation_strategies.*\['zero', 'drop'\]. Got 'noise'"):
        load_config({**base, "extract": {"truncation_strategies": ["noise"]}})
    with pytest.raises(ConfigError, match="truncation_layers.*non-empty when 'truncated' is run"):
        load_config({**base, "extract": {"conditions": ["truncated"]}})
    with pytest.raises(ConfigError, match="truncation_layers.*ints >= -1. Got -2"):
        load_config({**base, "extract": {"truncation_layers": [-2]}})


# --------------------------------------------------------------------------- every family's tiny model


def make_samples():
    return ragged_samples(N_SAMPLES, WIDE)


def extraction(r, tmp, **extract):
    cfg = load_config({
        "model": r.mcfg, "data": {"dataset": "synthetic", "options": {"n": N_SAMPLES, "image_size": 64}},
        "extract": {"batch_size": N_SAMPLES, "samples_per_shard": N_SAMPLES, "max_length": 512, "seed": 1, **extract},
    })
    ex = Extraction(cfg, tmp, model=r.model, processor=r.processor).load()
    ex.plan(r.samples, show=False)
    return ex



@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory, one_thread):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"iv_{family}")
    path = build_tiny_checkpoint(family, tmp / "ckpt", seed=0, num_layers=N_LAYERS)
    mcfg = dict(family=family, id=str(path), dtype="float32", attn_implementation=ATTN[family])
    model, processor = get_adapter(family).load(ModelConfig(**mcfg))
    r = SimpleNamespace(family=family, mcfg=mcfg, model=model, processor=processor, samples=make_samples(), tmp=tmp)
    r.ex = extraction(r, tmp / "out", conditions=list(conditions.KINDS), **conformance_options())
    assert all(p.ok for p in r.ex.planned), [p.failure for p in r.ex.planned]
    r.batch = list(range(N_SAMPLES))
    r.cond = {c.label: c for c in r.ex.conditions}
    assert sorted(r.cond) == sorted(LABELS)
    r.layers = get_adapter(family).decoder_layers(model)
    r.original = r.ex.forward(r.batch, r.cond["original"])
    return r


def assert_invariant(cond, results, original, n_layers=N_LAYERS):
    """The declared Invariant of ``cond`` on its forward results (per row: text (site, layer, hidden), gold)."""
    inv = cond.invariant(n_layers)
    for row, (res, ref) in enumerate(zip(results, original)):
        assert np.array_equal(res["text_states"][:, : inv.equal_through + 1], ref["text_states"][:, : inv.equal_through + 1]), \
            (cond.label, row, inv)
        if inv.later_differ:
            for layer in range(inv.equal_through + 1, n_layers + 1):
                assert not np.array_equal(res["text_states"][:, layer], ref["text_states"][:, layer]), (cond.label, row, layer)
    if inv.later_differ:
        assert any(res["gold_logprob"] != ref["gold_logprob"] for res, ref in zip(results, original)), cond.label
    if cond.hook(n_layers) is None and cond.image_kind == "original":  # nothing intervenes: original exactly
        for res, ref in zip(results, original):
            assert np.array_equal(res["text_states"], ref["text_states"]) and res["gold_logprob"] == ref["gold_logprob"]
            assert np.array_equal(res["candidate_logprob"], ref["candidate_logprob"], equal_nan=True)


@pytest.mark.parametrize("label", LABELS)
def test_recorded_states_satisfy_the_declared_invariant(run, label):
    cond = run.cond[label]
    results = run.ex.forward(run.batch, cond)
    assert all(("visual_states" in res) == cond.records_visual for res in results)
    assert_invariant(cond, results, run.original)



def hooked_inputs(r, cond, batch):
    """Per decoder layer: (hidden, allowed keys) just before and just after the condition's own hooks."""
    P = [r.ex.planned[i] for i in batch]
    inputs = r.ex.batch_inputs(batch, cond)
    seen = {}

    def probe(j, when):
        def fn(module, args, kwargs):
            h = hidden_of(args, kwargs)
            seen[j, when] = (h.detach().clone(), allowed_keys(kwargs.get("attention_mask"), h.shape[1],
                                                           inputs["attention_mask"]).expand(h.shape[0], -1, -1))
        return fn

    with torch.inference_mode(), r.ex.intervention(P, cond, inputs, offsets=[0] * len(P)):
        # registered after the intervention: "before" goes in front of it, "after" behind it
        handles = [m.register_forward_pre_hook(probe(j, "before"), with_kwargs=True, prepend=True)
                   for j, m in enumerate(r.layers)]
        handles += [m.register_forward_pre_hook(probe(j, "after"), with_kwargs=True) for j, m in enumerate(r.layers)]
        try:
            r.model(**inputs, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return P, inputs, seen


@pytest.mark.parametrize("label", HOOKED)
def test_hook_acts_on_its_declared_layers_and_positions_only(run, label):
    cond = run.cond[label]
    hook = cond.hook(N_LAYERS)
    acts_on = conditions.strategy(hook.strategy).acts_on
    batch = [0, 1] if run.family == "llava" else [0, 1, 2]  # Qwen: mixed span lengths, padded rows
    P, inputs, seen = hooked_inputs(run, cond, batch)
    b, seq = inputs["input_ids"].shape
    declared = torch.zeros(b, seq, dtype=torch.bool)
    for row, p in enumerate(P):
        declared[row, sorted(EXPECTED_POSITIONS[hook.positions](p, run.processor.tokenizer))] = True
    for j in range(N_LAYERS):
        (h0, a0), (h1, a1) = seen[j, "before"], seen[j, "after"]
        if j not in hook.layers:
            assert torch.equal(h0, h1) and torch.equal(a0, a1), (label, j)
            continue
        if acts_on == "states":
            assert torch.equal(a0, a1), (label, j)
            changed = (h0 != h1).any(-1)  # (batch, seq)
            assert not (changed & ~declared).any(), (label, j, "changed an undeclared position")
            assert all(changed[row].any() for row in range(b)), (label, j, "left a row untouched")
        else:
            assert torch.equal(h0, h1), (label, j)
            assert not (a1 & ~a0).any(), (label, j, "opened a masked key")
            removed = a0 & ~a1  # (batch, query, key)
            allowed_removal = (~declared)[:, :, None] & declared[:, None, :]
            assert not (removed & ~allowed_removal).any(), (label, j, "masked an undeclared pair")
            assert all(removed[row].any() for row in range(b)), (label, j, "left a row untouched")


def test_question_positions_are_the_question_s_content_tokens(run):
    """The text channel's positions: exactly the tokens that spell the question, none special, the instruction
    site the last of them, the template before and after them left out."""
    tok = run.processor.tokenizer
    special = set(tok.all_special_ids)
    for p in run.ex.planned:
        got = set(interventions.POSITIONS["question"](p))
        assert got == question_tokens(p, tok), (run.family, p.index)
        assert not {int(p.prompt_ids[t]) for t in got} & special
        assert max(got) == p.instruction and not got & set(range(p.visual_start, p.visual_start + p.visual_length))
        assert p.prediction not in got


def test_hooks_are_context_managers_and_remove_on_exit(run):
    r = run
    cond = r.cond[HOOKED[0]]
    counts = lambda: [len(m._forward_pre_hooks) for m in r.layers]  # noqa: E731
    before = counts()
    P = [r.ex.planned[0]]
    inputs = r.ex.batch_inputs([0], cond)
    with Capture(r.layers, get_adapter(r.family).final_norm(r.model), range(N_LAYERS + 1)) as cap, \
            r.ex.intervention(P, cond, inputs, offsets=[0]) as iv:
        assert isinstance(iv, interventions.Intervention) and counts() != before
        assert cap is not None
    assert counts() == before
    iv = r.ex.intervention(P, cond, inputs, offsets=[0])
    iv.remove()  # the explicit form still works
    assert counts() == before
    with pytest.raises(RuntimeError, match="boom"), Capture(r.layers, r.layers[-1], [0]):
        raise RuntimeError("boom")
    assert counts() == before


# --------------------------------------------------------------------------- a strategy added by a test


class Negate(interventions.Intervention):
    """Test-only strategy: the positions' states negated at the input of each hooked layer."""

    def hook(self, module, args, kwargs):
        h = hidden_of(args, kwargs)
        if h.shape[1] < self.batch.mask.shape[1]:
            return None
        rows, pos = self.batch.index
        h = h.clone()
        h[rows, pos] = -h[rows, pos]
        return replace_hidden(args, kwargs, h)


def test_a_strategy_added_to_the_registry_needs_no_other_edit(run, tmp_path, monkeypatch):
    r = run
    extract = {"conditions": ["original", "truncated"], "truncation_layers": [-1, 0],
               "truncation_strategies": ["zero", "negate"]}
    with pytest.raises(ConfigError, match="truncation_strategies.*Got 'negate'"):
        extraction(r, tmp_path / "refused", **extract)
    monkeypatch.setitem(conditions.STRATEGIES, "negate", conditions.Strategy(
        "negate", "visual-position states negated at the input of each layer > L", "states"))
    monkeypatch.setitem(interventions.IMPLEMENTATIONS, "negate", Negate)

    ex = extraction(r, tmp_path / "neg", **extract)  # validates
    assert [c.label for c in ex.conditions] == ["original", "truncated_zero_Lm1", "truncated_zero_L0",
                                                "truncated_negate_Lm1", "truncated_negate_L0"]
    neg = ex.conditions[-1]
    assert conditions.parse_label(neg.label) == neg and neg.hook(N_LAYERS).layers == (1, 2)
    P, inputs, seen = hooked_inputs(SimpleNamespace(**{**vars(r), "ex": ex}), neg, [0])
    h0, h1 = seen[1, "before"][0], seen[1, "after"][0]
    span = slice(P[0].visual_start, P[0].visual_start + P[0].visual_length)
    assert torch.equal(h1[0, span], -h0[0, span]) and not torch.equal(h1, h0)
    assert_invariant(neg, ex.forward(r.batch, neg), r.original)

    ex.run(show=False)  # and into a store
    ds = open_store(ex.store_path)
    assert [str(c) for c in ds.condition.values] == [c.label for c in ex.conditions]
    assert ds.attrs["condition_params"]["truncated"]["strategies"] == ["zero", "negate"]
    assert ds.attrs["conditions"][-1] == {"label": "truncated_negate_L0", "kind": "truncated",
                                          "truncation_layer": 0, "strategy": "negate"}
    assert list(ds.truncation_strategy.values) == ["", "zero", "zero", "negate", "negate"]
    text = ds.text_states.values  # (condition, sample, site, layer, hidden)
    assert np.array_equal(text[-1, :, :, :2], text[0, :, :, :2]) and not np.array_equal(text[-1, :, :, 2], text[0, :, :, 2])
