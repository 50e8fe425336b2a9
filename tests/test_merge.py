"""gapcache merge: more samples or more conditions; incompatible stores refused, naming the field."""

import numpy as np
import pytest
import zarr

from gapcache.conditions import expand
from gapcache.errors import IncompatibleStoreError, SchemaVersionError, StoreError
from gapcache.store import Layout, info, open_store, visual_span
from gapcache.store.cli import register
from gapcache.store.merge import merge
from gapcache.store.verify import verify
from helpers import random_payloads

PROV = {"model": {"id": "m", "revision": "abc"},
        "provenance": {"processor_class": "P", "chat_template_sha256": "t1", "tokenizer_vocab_sha256": "v"}}


def _layout(ids, lengths, conditions=("original", "blind_black", "truncated")):
    return Layout(sample_ids=tuple(ids), conditions=tuple(expand(list(conditions), [0], ["zero"])), layers=(0, 1, 2),
                  hidden=4, model_dtype="bfloat16", candidates=("no", "yes"), visual_lengths=tuple(lengths),
                  samples_per_shard=2, visual_chunk_tokens=4)


def _store(path, layout, seed, attrs=PROV, donor=True):
    from gapcache.store import StoreWriter, create

    n = layout.n_samples
    meta = {"question": np.array([f"q-{s}" for s in layout.sample_ids], dtype=object)}
    if donor:
        meta["donor"] = np.array([(i + 1) % n for i in range(n)], np.int64)
    create(path, layout, attrs, meta)
    with StoreWriter(path) as w:
        for p in random_payloads(layout, seed=seed):
            w.submit(p)
    return path


def _cli(argv):
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_merge_more_samples(tmp_path):
    a = _store(tmp_path / "a.zarr", _layout(["s0", "s1", "s2"], [3, 4, 0]), 1)
    b = _store(tmp_path / "b.zarr", _layout(["s3", "s4"], [2, 5]), 2)
    assert _cli(["merge", str(a), str(b), "--out", str(tmp_path / "m.zarr")]) == 0
    m = tmp_path / "m.zarr"
    assert verify(m).ok and info(m)["complete"] and info(m)["n_samples"] == 5
    dm, da, db = open_store(m), open_store(a), open_store(b)
    assert list(dm.sample.values) == ["s0", "s1", "s2", "s3", "s4"]
    for name in ("text_states", "gold_logprob", "candidate_logprob", "status"):
        np.testing.assert_array_equal(dm[name].values[:, :3], da[name].values)
        np.testing.assert_array_equal(dm[name].values[:, 3:], db[name].values)
    for i in range(5):
        src, j = (da, i) if i < 3 else (db, i - 3)
        np.testing.assert_array_equal(visual_span(dm, i).values, visual_span(src, j).values)
    assert dm.donor.values.tolist() == [1, 2, 0, 4, 3]  # remapped into the merged order
    assert dm.question.values.tolist() == [f"q-s{i}" for i in range(5)]
    assert [x["path"] for x in dm.attrs["merged_from"]] == [str(a), str(b)]


def test_merge_more_conditions(tmp_path):
    ids, lengths = ["s0", "s1", "s2", "s3"], [3, 1, 2, 2]
    a = _store(tmp_path / "a.zarr", _layout(ids, lengths, ("original", "blind_black")), 1)
    b = _store(tmp_path / "b.zarr", _layout(ids, lengths, ("blind_randomimage",)), 2)
    m = merge([a, b], tmp_path / "m.zarr")
    dm, da, db = open_store(m), open_store(a), open_store(b)
    assert list(dm.condition.values) == ["original", "blind_black", "blind_randomimage"]
    np.testing.assert_array_equal(dm.text_states.values[:2], da.text_states.values)
    np.testing.assert_array_equal(dm.text_states.values[2:], db.text_states.values)
    np.testing.assert_array_equal(dm.visual_states.sel(visual_condition="blind_randomimage").values,
                                  db.visual_states.sel(visual_condition="blind_randomimage").values)
    assert verify(m).ok


@pytest.mark.parametrize("field, change", [
    ("model.revision", lambda a: a["model"].update(revision="other")),
    ("provenance.chat_template_sha256", lambda a: a["provenance"].update(chat_template_sha256="t2")),
])
def test_incompatible_stores_refused_naming_the_field(tmp_path, field, change):
    import copy

    a = _store(tmp_path / "a.zarr", _layout(["s0", "s1"], [1, 1]), 1)
    attrs = copy.deepcopy(PROV)
    change(attrs)
    b = _store(tmp_path / "b.zarr", _layout(["s2"], [1]), 2, attrs=attrs)
    with pytest.raises(IncompatibleStoreError, match=field.replace(".", r"\.")):
        merge([a, b], tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


def test_schema_differences_refused(tmp_path):
    a = _store(tmp_path / "a.zarr", _layout(["s0", "s1"], [1, 1]), 1)
    lb = Layout(sample_ids=("s2",), conditions=_layout(["x"], [1]).conditions, layers=(0, 2), hidden=4,
                model_dtype="bfloat16", candidates=("no", "yes"), visual_lengths=(1,), samples_per_shard=2,
                visual_chunk_tokens=4)
    b = _store(tmp_path / "b.zarr", lb, 2)
    with pytest.raises(IncompatibleStoreError, match="'layer"):
        merge([a, b], tmp_path / "m.zarr")
    d = _store(tmp_path / "d.zarr", _layout(["s4"], [1]), 4)
    zarr.open_group(d, mode="r+").attrs["schema_version"] = 0
    with pytest.raises(SchemaVersionError, match="schema_version 0"):  # refused when opened, before comparing
        merge([a, d], tmp_path / "m3.zarr")
    c = _store(tmp_path / "c.zarr", _layout(["s3"], [1]), 3, donor=False)
    with pytest.raises(IncompatibleStoreError, match="per-sample metadata"):
        merge([a, c], tmp_path / "m2.zarr")


def test_overlapping_cells_and_differing_samples_refused(tmp_path):
    a = _store(tmp_path / "a.zarr", _layout(["s0", "s1"], [1, 1]), 1)
    b = _store(tmp_path / "b.zarr", _layout(["s1", "s2"], [1, 1]), 2)
    with pytest.raises(IncompatibleStoreError, match="'original' of sample 's1' is written in both"):
        merge([a, b], tmp_path / "m.zarr")
    c = _store(tmp_path / "c.zarr", _layout(["s1", "s2"], [3, 1], ("blind_randomimage",)), 2)
    with pytest.raises(IncompatibleStoreError, match="sample 's1' differs in 'visual_length'"):
        merge([a, c], tmp_path / "m.zarr")


def test_out_path_is_checked(tmp_path):
    a = _store(tmp_path / "a.zarr", _layout(["s0"], [1]), 1)
    b = _store(tmp_path / "b.zarr", _layout(["s1"], [1]), 2)
    with pytest.raises(StoreError, match=r"'\.\.'"):
        merge([a, b], str(tmp_path / "run" / ".." / ".." / "escape.zarr"))
    with pytest.raises(StoreError, match="already exists"):
        merge([a, b], a)
    (tmp_path / "link.zarr").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="symlink"):
        merge([a, b], tmp_path / "link.zarr")
    with pytest.raises(StoreError, match="read-only"):
        merge([a, b], "s3://bucket/out.zarr")


def test_merged_store_feeds_the_analysis(tmp_path):
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store

    a = _store(tmp_path / "a.zarr", _layout(["s0", "s1", "s2"], [3, 4, 2]), 1)
    b = _store(tmp_path / "b.zarr", _layout(["s3", "s4", "s5"], [2, 5, 1]), 2)
    m = merge([a, b], tmp_path / "m.zarr")
    summary, _ = analyze_store(open_store(m), AnalysisParams(metrics=("rank",), cliff_layer=1, n_resamples=20))
    assert "rank" in summary["metrics"]


def _layout_with(ids, lengths, conditions, layers):
    return Layout(sample_ids=tuple(ids), conditions=tuple(expand(list(conditions), layers, ["zero"])),
                  layers=(0, 1, 2), hidden=4, model_dtype="bfloat16", candidates=("no", "yes"),
                  visual_lengths=tuple(lengths), samples_per_shard=2, visual_chunk_tokens=4)


def test_condition_params_merge_by_each_kinds_rule(tmp_path):
    """Each kind's recorded parameters combine by its registry rule: truncation layers are the union, donors are
    remapped, blind_mean's colour must be the same in every input that ran blind_mean."""
    def params(mean, layers, donor):
        return {"blind_mean": {"mean_rgb": mean},
                "blind_randomimage": {"seed": 0, "donor": donor, "resize": "PIL"},
                "truncated": {"layers": layers, "strategies": ["zero"], "convention": "input of layers > L"}}

    conds = ("original", "blind_mean", "blind_randomimage", "truncated")
    a = _store(tmp_path / "a.zarr", _layout_with(["s0", "s1"], [2, 1], conds, [0]), 1,
               {**PROV, "condition_params": params([1.0, 2.0, 3.0], [0], [1, 0])})
    b = _store(tmp_path / "b.zarr", _layout_with(["s2", "s3"], [1, 2], conds, [1]), 2,
               {**PROV, "condition_params": params([1.0, 2.0, 3.0], [1], [1, 0])})
    m = open_store(merge([a, b], tmp_path / "m.zarr"))
    got = m.attrs["condition_params"]
    assert got["truncated"]["layers"] == [0, 1]
    assert got["blind_randomimage"]["donor"] == [1, 0, 3, 2] == m.donor.values.tolist()
    assert got["blind_mean"]["mean_rgb"] == [1.0, 2.0, 3.0]
    c = _store(tmp_path / "c.zarr", _layout_with(["s4"], [1], conds, [0]), 3,
               {**PROV, "condition_params": params([9.0, 9.0, 9.0], [0], [0])})
    with pytest.raises(IncompatibleStoreError, match=r"'condition_params.blind_mean.mean_rgb'"):
        merge([a, c], tmp_path / "m2.zarr")


def test_patched_condition_params_merge(tmp_path):
    """Single-layer patching: layers, channels and strategies are the union of the inputs', the swap's donors are
    remapped to the merged sample order, and each input's gaussian sigma is kept when they differ."""
    from gapcache.conditions import Condition

    def layout(ids, layer):
        conds = (Condition("original"), Condition("patched", strategy="swap", channel="visual", patch_layer=layer),
                 Condition("patched", strategy="gaussian", channel="text", patch_layer=layer))
        return Layout(sample_ids=tuple(ids), conditions=conds, layers=(0, 1, 2), hidden=4, model_dtype="bfloat16",
                      candidates=("no", "yes"), visual_lengths=(2, 1), samples_per_shard=2, visual_chunk_tokens=4)

    def params(layer, sigma):
        return {"patched": {"layers": [layer], "channels": ["visual", "text"], "strategies": ["swap", "gaussian"],
                            "sigma": {"visual": {str(layer): sigma}, "text": {str(layer): sigma / 2}},
                            "swap": {"donor": [1, 0], "seed": 0}}}

    a = _store(tmp_path / "a.zarr", layout(["s0", "s1"], 1), 1, {**PROV, "condition_params": params(1, 2.0)})
    b = _store(tmp_path / "b.zarr", layout(["s2", "s3"], 0), 2, {**PROV, "condition_params": params(0, 3.0)})
    m = open_store(merge([a, b], tmp_path / "m.zarr"))
    got = m.attrs["condition_params"]["patched"]
    assert got["layers"] == [0, 1] and got["channels"] == ["visual", "text"]
    assert got["swap"]["donor"] == [1, 0, 3, 2] == m.donor.values.tolist()
    assert [s["sigma"]["visual"] for s in got["sigma_of_inputs"]] == [{"1": 2.0}, {"0": 3.0}]
    assert sorted(str(c) for c in m.condition.values) == ["original", "patched_text_gaussian_L0",
                                                          "patched_text_gaussian_L1", "patched_visual_swap_L0",
                                                          "patched_visual_swap_L1"]
