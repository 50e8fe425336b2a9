"""Unit tests of the store contract, on synthetic arrays (no torch)."""

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from gapcache.errors import IncompatibleStoreError, SchemaVersionError, StoreError
from gapcache.store import codec, info, open_store, visual_span
from gapcache.store.schema import visual_offsets
from gapcache.store.writer import check_compatible
from helpers import random_payloads, roundtrip, small_layout

PORTABLE = {"bytes", "zstd", "gzip", "blosc", "crc32c", "sharding_indexed", "vlen-utf8"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_exact(tmp_path, dtype):
    layout = small_layout(dtype)
    payloads = random_payloads(layout)
    ds = roundtrip(tmp_path / "s.zarr", layout, payloads)
    for p in payloads:
        s0 = p.shard * layout.samples_per_shard
        want = codec.decode(p.text_states, codec.storage_for(dtype)[1]).astype(np.float32)
        got = ds.text_states.isel(condition=p.condition, sample=slice(s0, s0 + len(want))).values
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds.gold_logprob.values[p.condition, s0 : s0 + len(want)], p.gold_logprob)
        if p.visual_states is not None:
            vis_ci = list(ds.visual_condition.values).index(layout.conditions[p.condition].label)
            for i in layout.shard_samples(p.shard):
                span = visual_span(ds, i).isel(visual_condition=vis_ci).values
                off = layout.visual_offsets[i] - layout.visual_offsets[s0]
                want_v = codec.decode(p.visual_states, codec.storage_for(dtype)[1])[off : off + len(span)]
                np.testing.assert_array_equal(span, want_v)
    assert info(tmp_path / "s.zarr")["complete"] is True


def test_bf16_massive_activation_exact(tmp_path):
    """bf16 residual streams exceed float16's 65504: stored as bf16 bits, read back exactly."""
    layout = small_layout("bfloat16")
    payloads = random_payloads(layout)
    planted = np.float32(123904.0)  # exactly representable in bf16, far above float16's max
    payloads[0].text_states[0, 1, 2, 3] = codec.encode_bf16(np.array([planted]))[0]
    payloads[0].text_states[1, 0, 0, 0] = codec.encode_bf16(np.array([-3.0e38], np.float32))[0]
    ds = roundtrip(tmp_path / "s.zarr", layout, payloads)
    assert ds.text_states.values[0, 0, 1, 2, 3] == planted
    assert ds.text_states.values[0, 1, 0, 0, 0] == codec.decode_bf16(codec.encode_bf16(np.array([-3.0e38], np.float32)))[0]
    assert np.isfinite(ds.text_states.values).all()


def test_bf16_codec_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 65536.0, 1e30], np.float32)
    back = codec.decode_bf16(codec.encode_bf16(x))
    np.testing.assert_array_equal(back[[0, 3, 4]], x[[0, 3, 4]])
    assert back[1] == 1.0  # halfway between 1.0 and 1.0078125: ties to even
    assert back[2] == 1.015625  # halfway between 1.0078125 and 1.015625: ties to even (0x3F82)
    assert abs(back[5] / 1e30 - 1) < 2**-8


def test_plain_xarray_opens_without_gapcache_decoding(tmp_path):
    layout = small_layout("bfloat16")
    roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    raw = xr.open_zarr(tmp_path / "s.zarr")
    assert raw.text_states.dims == ("condition", "sample", "site", "layer", "hidden")
    assert raw.visual_states.dims == ("visual_condition", "vtoken", "layer", "hidden")
    assert raw.text_states.dtype == np.uint16 and raw.text_states.attrs["gapcache_encoding"] == "bfloat16"
    assert raw.gold_logprob.dims == ("condition", "sample")
    assert list(raw.sample.values) == list(layout.sample_ids)
    assert "condition_kind" in raw.coords and "vtoken_sample" in raw.coords
    assert raw.text_states.chunks is not None  # lazy (dask)
    decoded = (raw.text_states.values.astype("uint32") << 16).view("float32")  # the documented one-liner
    np.testing.assert_array_equal(decoded, open_store(tmp_path / "s.zarr").text_states.values)


def test_only_portable_codecs(tmp_path):
    layout = small_layout("bfloat16")
    roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")

    def names(codecs):
        found = set()
        for c in codecs:
            c = c if isinstance(c, dict) else c.to_dict()
            found.add(c["name"])
            cfg = c.get("configuration", {})
            found |= names(cfg.get("codecs", ())) | names(cfg.get("index_codecs", ()))
        return found

    for name, arr in g.arrays():
        assert names(arr.metadata.to_dict()["codecs"]) <= PORTABLE, name
    assert "sharding_indexed" in {c["name"] for c in g["text_states"].metadata.to_dict()["codecs"]}


def test_visual_offsets_align_each_shard_group():
    offsets, shard_tokens, total = visual_offsets([3, 4, 0, 2, 5], 2, 4)
    assert offsets == (0, 3, 8, 8, 16)
    assert shard_tokens == 8 and total == 24


def test_unknown_schema_version_refused(tmp_path):
    layout = small_layout()
    roundtrip(tmp_path / "s.zarr", layout, [])
    g = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    g.attrs["schema_version"] = 99
    with pytest.raises(SchemaVersionError, match="schema_version 99"):
        open_store(tmp_path / "s.zarr")


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="No gapcache store"):
        open_store(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not a gapcache store"):
        open_store(tmp_path / "plain.zarr")


def test_pending_and_info_counts(tmp_path):
    layout = small_layout()
    payloads = [p for p in random_payloads(layout) if not (p.condition == 1 and p.shard == 2)]
    payloads[0].status[1] = 2
    roundtrip(tmp_path / "s.zarr", layout, payloads)
    from gapcache.store import StoreWriter

    with StoreWriter(tmp_path / "s.zarr") as w:
        assert w.pending(0) == [] and w.pending(1) == [2]
    d = info(tmp_path / "s.zarr")
    assert d["conditions"]["original"] == {"done": 4, "failed": 1, "pending": 0}
    assert d["conditions"]["blind_black"]["pending"] == 1
    assert d["complete"] is False and d["n_samples"] == 5
    json.dumps(d)


def test_writer_error_surfaces_and_resume_check(tmp_path):
    layout = small_layout()
    roundtrip(tmp_path / "s.zarr", layout, [])
    from gapcache.store import StoreWriter

    bad = random_payloads(layout)[0]
    bad.text_states = bad.text_states[:, :, :1]  # wrong shape
    with pytest.raises(StoreError, match="Writing to"):
        with StoreWriter(tmp_path / "s.zarr") as w:
            w.submit(bad)
    with pytest.raises(IncompatibleStoreError, match="'model'"):
        check_compatible(tmp_path / "s.zarr", {"model": {"id": "other"}}, ["model"])


def test_uncompressed_states_roundtrip_and_cost_two_bytes(tmp_path):
    """compression_level 0: no compressor in the chain, bf16 states at 2 bytes a value (+ the index)."""
    import dataclasses

    from gapcache.store import Layout
    from gapcache.store.reader import size_on_disk

    base = small_layout("bfloat16", lengths=(64,) * 4, spc=2)
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(Layout) if f.init}
    layout = Layout(**{**kw, "compression_level": 0, "hidden": 256, "visual_chunk_tokens": 64})
    payloads = random_payloads(layout)
    ds = roundtrip(tmp_path / "s.zarr", layout, payloads)
    codecs = zarr.open_group(tmp_path / "s.zarr", mode="r")["visual_states"].metadata.to_dict()["codecs"]
    inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
    assert inner == ["bytes"]
    vis = tmp_path / "s.zarr" / "visual_states"
    n_values = sum(p.visual_states.size for p in payloads if p.visual_states is not None)
    assert size_on_disk(vis) / n_values < 2.01
    np.testing.assert_array_equal(ds.visual_states.values[0, :64], codec.decode_bf16(payloads[0].visual_states[:64]))


def test_states_are_read_one_layer_of_one_shard_a_block_decoded_as_read(tmp_path):
    """Dask blocks of the hidden states follow the store's chunking (one layer of one shard, rows of a whole
    shard group), not its inner chunks; values are the raw bits decoded, bit for bit, and a slice of a block
    reads only the inner chunks it covers."""
    from gapcache.store.reader import state_chunks

    layout = small_layout(dtype="bfloat16", lengths=(3, 4, 0, 2, 5), spc=2)
    ds = roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    raw = open_store(tmp_path / "s.zarr", decode=False)
    vshard = layout.visual_shard_tokens  # 8: two inner chunks of 4 tokens
    assert ds.visual_states.data.chunks[1] == (vshard,) * layout.n_shards and ds.visual_states.data.chunks[2] == (1,) * 3
    assert ds.text_states.data.chunksize == (1, 2, 1, 1, 4) and ds.visual_states.dtype == np.float32
    assert raw.visual_states.data.chunks == ds.visual_states.data.chunks and raw.visual_states.dtype == np.uint16
    for name in ("visual_states", "text_states"):
        np.testing.assert_array_equal(ds[name].values, codec.decode_bf16(raw[name].values))
    np.testing.assert_array_equal(ds.visual_states[0, 5:7, 1].values, codec.decode_bf16(raw.visual_states[0, 5:7, 1].values))
    # a block over the byte budget is split into whole inner chunks that divide the shard
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["visual_states"]
    assert state_chunks(arr) == (1, vshard, 1, 4)
    assert state_chunks(arr, max_bytes=4 * 4 * 4) == (1, 4, 1, 4)  # one inner chunk: 4 tokens x 4 hidden x 4 B
    assert state_chunks(arr, max_bytes=1) == (1, 4, 1, 4)  # never below one inner chunk


def test_create_raises_an_array_error_and_writes_nothing(tmp_path, monkeypatch):
    """The store is built in memory and written only once every node is made: an array that zarr refuses raises
    its own error and leaves no file at the path (not a store that looks whole, nor a partial one)."""
    from gapcache.store import create, writer

    made = []
    real = writer._array_kwargs

    def kwargs(spec, shape, layout, attributes=None):
        kw = real(spec, shape, layout, attributes)
        made.append(spec.name)
        return {**kw, "chunks": (1,) * (len(shape) + 1)} if spec.name == "gold_logprob" else kw  # wrong rank

    monkeypatch.setattr(writer, "_array_kwargs", kwargs)
    path = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="same number of dimensions"):  # zarr's refusal of gold_logprob's chunks
        create(path, small_layout(), {"model": {"id": "test"}}, {"question": np.array(["q"] * 5, dtype=object)})
    assert "gold_logprob" in made and len(made) > 20
    assert not path.exists()


def test_create_writes_the_consolidated_metadata_zarr_would(tmp_path):
    """The store built in memory and written in one pass: its root zarr.json (attributes and consolidated
    metadata) is byte for byte what zarr.consolidate_metadata writes for the files on disk."""
    import warnings

    from gapcache.store import create

    path = tmp_path / "s.zarr"
    create(path, small_layout(), {"model": {"id": "test"}}, {"question": np.array(["q"] * 5, dtype=object)})
    written = (path / "zarr.json").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    assert (path / "zarr.json").read_bytes() == written
    arrays_on_disk = {p.parent.name for p in path.glob("*/zarr.json")}
    assert json.loads(written)["consolidated_metadata"]["metadata"].keys() == arrays_on_disk


def test_create_refuses_a_path_that_holds_files_unless_overwrite(tmp_path):
    from gapcache.errors import StoreError
    from gapcache.store import create

    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not empty.*overwrite=True"):
        create(path, small_layout(), {"model": {"id": "test"}}, {"question": np.array(["q"] * 5, dtype=object)})
    assert (path / "notes.txt").read_text() == "mine"
    create(path, small_layout(), {"model": {"id": "first"}}, {"question": np.array(["q"] * 5, dtype=object)},
           overwrite=True)
    assert not (path / "notes.txt").exists()
    with pytest.raises(StoreError, match="exists and is not empty"):  # a store there now
        create(path, small_layout(), {"model": {"id": "x"}}, {"question": np.array(["q"] * 5, dtype=object)})
    create(path, small_layout(), {"model": {"id": "second"}}, {"question": np.array(["r"] * 5, dtype=object)},
           overwrite=True)
    ds = open_store(path)
    assert ds.attrs["model"] == {"id": "second"} and list(ds["question"].values) == ["r"] * 5
