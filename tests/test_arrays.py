"""The one table of store arrays (gapcache.store.arrays): every declared array is written, read, verified
and merged by iterating over it; every byte of every array is checked."""

import json
import shutil

import numpy as np
import pytest
import zarr

from gapcache.errors import DamagedChunkError, StoreError
from gapcache.store import StoreWriter, arrays, create, open_store
from gapcache.store.merge import merge
from gapcache.store.schema import Layout
from gapcache.store.verify import verify
from helpers import random_payloads, random_values, small_layout

ROUTING = (3, 4, 2)  # the optional MoE routing arrays: 3 router layers, 4 experts, top-2


def creation_values(layout: Layout, seed=0) -> dict:
    """Random values of every optional creation-time array (per-sample metadata, lens tables), by the table."""
    rng = np.random.default_rng(seed)
    sizes = {**layout.sizes(), "lens_token": 3}
    derived = layout.derived_values()
    out = {}
    same = np.random.default_rng(0)  # whole-store tables every input of a merge must agree on: one value for all
    for spec in arrays.specs((arrays.STORE, arrays.SAMPLE, arrays.SPAN)):
        if spec.name in derived or (spec.span and not layout.has_span(spec.span)):
            continue
        shape = tuple(sizes.setdefault(d, 2) for d in spec.dims)
        equal = spec.along == arrays.STORE and spec.merge_rule == arrays.MERGE_EQUAL
        out[spec.name] = random_values(spec, shape, same if equal else rng, layout.model_dtype)
    out["donor"] = np.roll(np.arange(layout.n_samples), 1)  # sample indices (remapped by merge)
    return out


def every_span_layout():
    """small_layout with every optional span recorded too (so the store holds every declared array)."""
    import dataclasses

    base = small_layout("bfloat16", routing=ROUTING)
    extra = tuple((name, tuple(range(2, 2 + base.n_samples))) for name, sp in arrays.SPANS.items() if sp.optional)
    return dataclasses.replace(base, span_lengths=extra)


def full_store(path, layout=None, seed=0):
    """A store holding every declared array, every unit written (every chunk holding data, none all fill)."""
    layout = layout or every_span_layout()
    create(path, layout, {"model": {"id": "test"}}, creation_values(layout, seed))
    with StoreWriter(path) as w:
        for p in random_payloads(layout, seed=seed):
            p.values["generation"] = np.array([f"gen {p.condition} {i}" for i in range(p.n)], dtype=object)
            p.values["error"] = np.array(["an error"] * p.n, dtype=object)
            w.submit(p)
    return path


def first_chunk_file(path, name):
    files = sorted(p for p in (path / name / "c").rglob("*") if p.is_file())
    assert files, name
    return files[0]


def flip_bit(file, at=None):
    b = bytearray(file.read_bytes())
    i = len(b) // 2 if at is None else at
    b[i] ^= 0x04
    file.write_bytes(bytes(b))


def test_a_store_holds_every_declared_array(tmp_path):
    path = full_store(tmp_path / "s.zarr")
    g = zarr.open_group(str(path), mode="r")
    assert sorted(n for n, _ in g.arrays()) == sorted(arrays.ARRAYS)
    for spec in arrays.ARRAYS.values():
        assert tuple(g[spec.name].metadata.dimension_names) == spec.dims, spec.name
    rep = verify(path)
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)


@pytest.mark.parametrize("name", list(arrays.ARRAYS))
def test_one_flipped_bit_in_any_array_is_named_by_verify(tmp_path, name):
    path = full_store(tmp_path / "s.zarr")
    flip_bit(first_chunk_file(path, name))
    rep = verify(path)
    assert not rep.ok
    named = [p for p in rep.problems if p.startswith(f"array {name!r} chunk ") or p.startswith(f"{name} shard ")]
    assert named, rep.problems
    assert all(name in p or "status" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize("name", [s.name for s in arrays.specs(state=False)])
def test_reading_a_damaged_chunk_names_the_array_and_the_chunk(tmp_path, name):
    path = full_store(tmp_path / "s.zarr")
    chunk = first_chunk_file(path, name)
    flip_bit(chunk)
    key = "/".join(chunk.relative_to(path / name).parts)
    with pytest.raises(DamagedChunkError) as err:
        ds = open_store(path)  # index coordinates are read here
        ds[name].values
    msg = str(err.value)
    assert f"Array {name!r}" in msg and key in msg and "gapcache verify" in msg


def test_a_deleted_creation_time_chunk_is_missing_not_fill(tmp_path):
    path = full_store(tmp_path / "s.zarr")
    first_chunk_file(path, "question").unlink()
    rep = verify(path)
    assert any(p.startswith("array 'question' chunk c/0: missing") for p in rep.problems), rep.problems


def test_an_edited_status_flag_is_caught(tmp_path):
    path = full_store(tmp_path / "s.zarr")
    g = zarr.open_group(str(path), mode="r+")
    assert g["status"][1, 2] == 1
    g["status"][1, 2] = 2  # done -> failed, written through zarr: a valid chunk, but not the one recorded
    rep = verify(path)
    assert any(p.startswith("status shard c/1/1 (condition 'blind_black', samples 2..3): checksum mismatch")
               for p in rep.problems), rep.problems


def test_status_records_are_healed_after_a_kill_between_flags_and_record(tmp_path):
    path = full_store(tmp_path / "s.zarr")
    (path / "status" / "checksums" / "c.0.1.json").unlink()  # the writer died right after the flags
    assert any("status shard c/0/1" in p and "no checksum record" in p for p in verify(path).problems)
    with StoreWriter(path) as w:  # every writer heals when it opens (a resume by any caller, not only the runner)
        assert w.healed == 1 and w.heal_flag_records() == 0
    assert verify(path).ok


def test_create_and_payloads_refuse_undeclared_arrays(tmp_path):
    from gapcache.store import ShardPayload

    layout = small_layout()
    with pytest.raises(StoreError, match=r"\['colour'\] are not declared"):
        create(tmp_path / "s.zarr", layout, {}, {"colour": np.zeros(layout.n_samples)})
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(StoreError, match="'colour' is not declared"):
        ShardPayload(0, 0, {"status": np.ones(2, np.uint8), "colour": np.zeros(2)})
    with pytest.raises(StoreError, match="holds unit arrays only"):
        ShardPayload(0, 0, {"status": np.ones(2, np.uint8), "question": np.array(["q", "q"], dtype=object)})


@pytest.fixture
def extra_arrays(monkeypatch):
    """Test-only arrays of three kinds, declared by one entry each and nothing else."""
    specs = [
        arrays.ArraySpec("test_router", ("condition", "sample", "layer"), "int16", arrays.UNIT,
                         "a per-(condition, sample) quantity", fill=-1, since=2),
        arrays.ArraySpec("test_note", ("sample",), arrays.STR, arrays.SAMPLE, "a per-sample string", since=2,
                         required=False),
        arrays.ArraySpec("test_table", ("test_k", "hidden"), "float32", arrays.STORE, "a whole-store table",
                         since=2, required=False),
    ]
    for spec in specs:
        monkeypatch.setitem(arrays.ARRAYS, spec.name, spec)
    return specs


def _two_stores(tmp_path):
    la = Layout(("s0", "s1", "s2"), small_layout().conditions, (0, 1, 2), 4, "bfloat16", ("no", "yes"), (3, 4, 0),
                samples_per_shard=2, visual_chunk_tokens=4, routing=ROUTING)  # every declared array
    lb = Layout(("s3", "s4"), la.conditions, la.layers, 4, "bfloat16", la.candidates, (2, 5), samples_per_shard=2,
                visual_chunk_tokens=4, routing=la.routing)
    table = np.arange(8, dtype=np.float32).reshape(2, 4)
    paths = []
    for name, layout, seed in (("a", la, 1), ("b", lb, 2)):
        values = creation_values(layout, seed)
        values["test_note"] = np.array([f"note {name}{i}" for i in range(layout.n_samples)], dtype=object)
        values["test_table"] = table
        path = tmp_path / f"{name}.zarr"
        create(path, layout, {"model": {"id": "test"}}, values)
        with StoreWriter(path) as w:
            for p in random_payloads(layout, seed=seed):
                w.submit(p)
        paths.append(path)
    return paths


def test_a_test_only_array_round_trips_through_write_verify_merge_and_open(tmp_path, extra_arrays):
    a, b = _two_stores(tmp_path)
    for path in (a, b):
        rep = verify(path)
        assert rep.ok, rep.problems
        assert (path / "test_router" / "checksums").is_dir()  # recorded at commit, like every unit array
    merged = merge([a, b], tmp_path / "m.zarr")
    rep = verify(merged)
    assert rep.ok, rep.problems
    ds, da, db = open_store(merged), open_store(a), open_store(b)
    for spec in arrays.ARRAYS.values():  # every declared array the inputs hold reaches the merged store
        assert (spec.name in ds.variables) == (spec.name in da.variables), spec.name
    np.testing.assert_array_equal(ds.test_router.values[:, :3], da.test_router.values)
    np.testing.assert_array_equal(ds.test_router.values[:, 3:], db.test_router.values)
    assert (ds.test_router.values != -1).all()
    assert [str(x) for x in ds.test_note.values] == ["note a0", "note a1", "note a2", "note b0", "note b1"]
    np.testing.assert_array_equal(ds.test_table.values, da.test_table.values)
    np.testing.assert_array_equal(ds.donor.values, [2, 0, 1, 4, 3])  # indices remapped to the merged order
    flip_bit(first_chunk_file(merged, "test_router"))
    assert any(p.startswith("array 'test_router' chunk") for p in verify(merged).problems)


def test_merge_refuses_different_whole_store_tables(tmp_path, extra_arrays):
    a, b = _two_stores(tmp_path)
    g = zarr.open_group(str(b), mode="r+")
    g["test_table"][0, 0] = 99.0
    from gapcache.errors import IncompatibleStoreError

    with pytest.raises(IncompatibleStoreError, match="'test_table' differs"):
        merge([a, b], tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


# ------------------------------------------------------------------ stores written by schema 1 (round 1's code)
FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "schema1_store"


def _numbers(obj, prefix=""):
    """Flatten a summary into {path: number} (timings and paths dropped)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("timing_s", "seconds", "path", "provenance", "created"):
                continue
            out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def _assert_same_numbers(got, want):
    """Every recorded number again, to float rounding (rel 1e-9): the recording machine's BLAS and this
    one's round the rank metric's SVDs differently in the 14th digit (seen on a fresh venv, 2026-12-02)."""
    g, w = _numbers(got), _numbers(want)
    missing = sorted(set(w) - set(g))
    assert not missing, missing[:10]
    bad = [(k, g[k], w[k]) for k in w
           if not (g[k] == w[k] or (g[k] != g[k] and w[k] != w[k]) or abs(g[k] - w[k]) <= 1e-9 * abs(w[k]))]
    assert not bad, bad[:10]


@pytest.fixture
def old_store(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, path)
    return path


def test_a_schema_1_store_opens_verifies_and_analyses_to_its_recorded_numbers(old_store, tmp_path):
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis

    assert open_store(old_store).attrs["schema_version"] == 1
    rep = verify(old_store)
    assert rep.ok, rep.problems
    assert any("gapcache migrate" in w for w in rep.warnings)
    summary = run_analysis([old_store], tmp_path / "ana", AnalysisParams())
    want = json.loads((FIXTURE.parent / "schema1_summary.json").read_text())
    _assert_same_numbers(summary["stores"]["store"]["metrics"], want["stores"]["store"]["metrics"])


def test_migrate_upgrades_a_schema_1_store_in_place_keeping_every_value(old_store, tmp_path):
    from gapcache.cli import main

    before = open_store(old_store).load()
    assert main(["migrate", str(old_store)]) == 0
    after = open_store(old_store)
    assert after.attrs["schema_version"] == 2
    for name in before.variables:
        np.testing.assert_array_equal(after[name].values, before[name].values, err_msg=name)
    rep = verify(old_store)
    assert rep.ok and not any("migrate" in w for w in rep.warnings), (rep.problems, rep.warnings)
    assert main(["migrate", str(old_store)]) == 0  # already current: nothing to do
    flip_bit(first_chunk_file(old_store, "label"))  # the case: a flipped bit in the probe labels
    assert any(p.startswith("array 'label' chunk c/0") for p in verify(old_store).problems)


def test_migrate_finishes_or_undoes_a_swap_cut_by_a_kill(old_store):
    from gapcache.store.migrate import migrate

    (old_store / "question").rename(old_store / ".question.old")  # killed between the two renames
    assert migrate(old_store)["to"] == 2
    assert verify(old_store).ok
    assert [str(x) for x in open_store(old_store).question.values][:1] == \
        [str(x) for x in open_store(FIXTURE).question.values][:1]


def test_migrate_refuses_a_damaged_store(old_store):
    from gapcache.store.migrate import migrate

    f = first_chunk_file(old_store, "text_states")
    flip_bit(f)
    with pytest.raises(StoreError, match="does not verify, so it is not migrated"):
        migrate(old_store)
    assert open_store(old_store).attrs["schema_version"] == 1


@pytest.fixture
def extra_span():
    """A test-only ragged span recorded under every condition (like issue 14's every-text-token record)."""
    saved_arrays, saved_spans = dict(arrays.ARRAYS), dict(arrays.SPANS)
    span = arrays.register_span(arrays.SpanSpec("alltext", "atoken", "alltext_condition", "always",
                                                "residual stream at every text token"))
    yield span
    arrays.ARRAYS.clear()
    arrays.ARRAYS.update(saved_arrays)
    arrays.SPANS.clear()
    arrays.SPANS.update(saved_spans)


def test_a_new_span_is_one_declaration_written_verified_merged_and_read(tmp_path, extra_span):
    from gapcache.store.reader import span_rows

    base = small_layout("bfloat16")
    paths = []
    for name, ids, vis, text in (("a", ("s0", "s1", "s2"), (3, 4, 0), (5, 1, 7)), ("b", ("s3", "s4"), (2, 5), (2, 9))):
        layout = Layout(ids, base.conditions, base.layers, 4, "bfloat16", base.candidates, vis, samples_per_shard=2,
                        visual_chunk_tokens=4, span_lengths=(("alltext", text),))
        create(tmp_path / f"{name}.zarr", layout, {"model": {"id": "test"}}, {})
        with StoreWriter(tmp_path / f"{name}.zarr") as w:
            for p in random_payloads(layout, seed=len(name) + len(ids)):
                w.submit(p)
        rep = verify(tmp_path / f"{name}.zarr")
        assert rep.ok, rep.problems
        paths.append(tmp_path / f"{name}.zarr")
    ds = open_store(paths[0])
    assert ds.alltext_states.dims == ("alltext_condition", "atoken", "layer", "hidden")
    assert list(ds.alltext_condition.values) == list(ds.condition.values)  # recorded under every condition
    assert span_rows(ds, "s2", "alltext").sizes["atoken"] == 7
    merged = merge(paths, tmp_path / "m.zarr")
    assert verify(merged).ok
    dm = open_store(merged)
    for src in (open_store(paths[0]), open_store(paths[1])):
        for sid in src.sample.values:
            np.testing.assert_array_equal(span_rows(dm, str(sid), "alltext").values,
                                          span_rows(src, str(sid), "alltext").values)
    flip_bit(first_chunk_file(merged, "alltext_states"))
    assert any(p.startswith("alltext_states shard") for p in verify(merged).problems)
