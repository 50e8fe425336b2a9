"""Direct shard writes (store/shardio.py): the Zarr v3 sharding_indexed format, read back by zarr and xarray."""

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, ZstdCodec

from gapcache.store import StoreWriter, codec, create, open_store
from gapcache.store import writer as writer_mod
from gapcache.store.shardio import MISSING, ShardArray, UnsupportedShardFormat, crc32c
from helpers import random_payloads, roundtrip, small_layout

STATES = ("text_states", "visual_states")
META = {"question": np.array(["q"] * 5, dtype=object)}


def _write(path, layout, payloads, direct=True):
    create(path, layout, {"model": {"id": "test"}}, META)
    with StoreWriter(path, direct=direct) as w:
        if direct:
            assert set(w.direct) == set(STATES) and not w.fallback, w.fallback
        for p in payloads:
            w.submit(p)
    return path


def _shard_files(path: Path, name: str) -> dict[str, bytes]:
    root = path / name
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in sorted(root.rglob("*")) if f.is_file() and f.name != "zarr.json" and f.relative_to(root).parts[0] != "checksums"
    }


def _chunks(sa: ShardArray, blob: bytes) -> list[bytes | None]:
    """Encoded inner chunks of a shard file (C order), None where missing; checks the index crc."""
    n = sa.index_nbytes
    index = blob[-n:] if sa.index_location == "end" else blob[:n]
    if sa.index_crc:
        assert crc32c(index[:-4]) == int.from_bytes(index[-4:], "little")
    oal = np.frombuffer(index[: 16 * (n // 16)], dtype=sa.index_dtype).reshape(-1, 2)
    return [None if o == MISSING else blob[int(o) : int(o) + int(k)] for o, k in oal]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_direct_shards_read_back_like_zarr_writes(tmp_path, dtype):
    """Same payloads through shardio and through zarr-python: same values, same encoded inner chunks."""
    layout = small_layout(dtype)  # 5 samples, 2 per shard: a partial last shard; ragged visual groups
    payloads = random_payloads(layout, seed=1)
    a = _write(tmp_path / "direct.zarr", layout, payloads)
    b = _write(tmp_path / "zarr.zarr", layout, payloads, direct=False)
    for name in STATES:
        got, want = zarr.open_array(a / name, mode="r"), zarr.open_array(b / name, mode="r")
        assert got.dtype == want.dtype == codec.storage_for(dtype)[0]
        np.testing.assert_array_equal(got[...], want[...])
        files_a, files_b = _shard_files(a, name), _shard_files(b, name)
        assert files_a.keys() == files_b.keys()  # chunk key encoding, no stray temporary files
        sa = ShardArray.from_path(a / name)
        for key in files_a:
            assert _chunks(sa, files_a[key]) == _chunks(sa, files_b[key]), (name, key)
    ds_a, ds_b = xr.open_zarr(a), xr.open_zarr(b)
    for name in STATES:
        xr.testing.assert_identical(ds_a[name].load(), ds_b[name].load())
    # and the decoded values are the payloads' (partial last shard, visual spans)
    dec = open_store(a)
    enc = codec.storage_for(dtype)[1]
    for p in payloads:
        s0 = p.shard * layout.samples_per_shard
        want_t = codec.decode(p.text_states, enc)
        got_t = dec.text_states.isel(condition=p.condition, sample=slice(s0, s0 + len(want_t))).values
        np.testing.assert_array_equal(got_t, want_t)
        if p.visual_states is not None:
            vi = list(dec.visual_condition.values).index(layout.conditions[p.condition].label)
            v0 = p.shard * layout.visual_shard_tokens
            got_v = dec.visual_states.isel(visual_condition=vi, vtoken=slice(v0, v0 + len(p.visual_states))).values
            np.testing.assert_array_equal(got_v, codec.decode(p.visual_states, enc))


@pytest.mark.parametrize("compressed", [True, False])
def test_byte_identical_to_zarr_on_one_dimensional_chunk_grids(tmp_path, monkeypatch, compressed):
    """With one layer every shard's inner chunk grid is 1-d, where zarr's Morton order is C order."""
    if not compressed:
        monkeypatch.setattr(writer_mod.codec, "state_codecs", lambda *a: None)
    base = small_layout("bfloat16")
    layout = type(base)(
        sample_ids=base.sample_ids, conditions=base.conditions, layers=(0,), hidden=4, model_dtype="bfloat16",
        candidates=base.candidates, visual_lengths=(5, 6, 0, 2, 5), samples_per_shard=2, visual_chunk_tokens=4,
    )
    payloads = random_payloads(layout, seed=2)
    a = _write(tmp_path / "direct.zarr", layout, payloads)
    b = _write(tmp_path / "zarr.zarr", layout, payloads, direct=False)
    for name in STATES:
        assert _shard_files(a, name) == _shard_files(b, name), name
    if not compressed:  # no compressor: 2 bytes a value plus the index
        assert zarr.open_array(a / "text_states").compressors == ()
        files = _shard_files(a, "visual_states")
        sa = ShardArray.from_path(a / "visual_states")
        for blob in files.values():
            present = sum(c is not None for c in _chunks(sa, blob))
            assert len(blob) == present * 2 * int(np.prod(sa.chunk_shape)) + sa.index_nbytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uncompressed_multi_dimensional_grids(tmp_path, monkeypatch, dtype):
    """No compressor: chunks written from views of the payload (or gathered when it is strided)."""
    monkeypatch.setattr(writer_mod.codec, "state_codecs", lambda *a: None)
    layout = small_layout(dtype)
    payloads = random_payloads(layout, seed=3)
    for p in payloads[::2]:  # strided blocks take the gather path
        p.text_states = np.asfortranarray(p.text_states)
    a = _write(tmp_path / "direct.zarr", layout, payloads)
    b = _write(tmp_path / "zarr.zarr", layout, payloads, direct=False)
    for name in STATES:
        np.testing.assert_array_equal(zarr.open_array(a / name)[...], zarr.open_array(b / name)[...])
        sa = ShardArray.from_path(a / name)
        files_a, files_b = _shard_files(a, name), _shard_files(b, name)
        assert files_a.keys() == files_b.keys()
        for key in files_a:
            assert _chunks(sa, files_a[key]) == _chunks(sa, files_b[key]), (name, key)


def test_inner_crc32c_codec(tmp_path):
    arr = zarr.create_array(tmp_path / "c.zarr", shape=(5, 6), chunks=(2, 3), shards=(4, 6), dtype="uint16",
                            compressors=[ZstdCodec(level=1), Crc32cCodec()])
    data = np.arange(30, dtype=np.uint16).reshape(5, 6)
    sa = ShardArray.open(arr)
    assert [name for name, _ in sa.bytes_codecs] == ["zstd", "crc32c"]
    sa.write((0, 0), data[:4])
    sa.write((1, 0), data[4:])
    np.testing.assert_array_equal(arr[...], data)


def test_block_cast_to_storage_dtype(tmp_path):
    arr = zarr.create_array(tmp_path / "c.zarr", shape=(4, 6), chunks=(2, 3), shards=(4, 6), dtype="float32",
                            compressors=None)
    block = np.arange(24, dtype=np.int64).reshape(4, 6)
    ShardArray.open(arr).write((0, 0), block)
    np.testing.assert_array_equal(arr[...], block.astype(np.float32))


def test_index_crc32c_matches_zarr_and_is_checked(tmp_path):
    layout = small_layout("float16")
    payloads = random_payloads(layout)
    a = _write(tmp_path / "direct.zarr", layout, payloads)
    b = _write(tmp_path / "zarr.zarr", layout, payloads, direct=False)
    sa = ShardArray.from_path(a / "text_states")
    key = sa.shard_key((0, 1, 0, 0, 0))
    ours, theirs = (a / "text_states" / key).read_bytes(), (b / "text_states" / key).read_bytes()
    n = sa.index_nbytes
    assert n == 16 * 2 * 3 + 4  # (site, layer) inner chunks, then the crc
    # zarr's own index: our crc32c of its index bytes is the checksum zarr appended
    assert theirs[-4:] == np.array([crc32c(theirs[-n:-4])], "<u4").tobytes()
    assert ours[-4:] == np.array([crc32c(ours[-n:-4])], "<u4").tobytes()
    # same chunk sizes; our chunks lie in C order of the grid (zarr's in Morton order)
    t_ours, t_theirs = (np.frombuffer(x[-n:-4], "<u8").reshape(-1, 2) for x in (ours, theirs))
    np.testing.assert_array_equal(t_ours[:, 1], t_theirs[:, 1])
    assert (np.diff(t_ours[:, 0].astype(np.int64)) > 0).all() and t_ours[0, 0] == 0
    # zarr verifies our checksum: a flipped index byte is refused
    path = a / "text_states" / key
    bad = bytearray(ours)
    bad[-n] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(a / "text_states", mode="r")[0, 2:4]


def test_missing_and_padded_chunks_read_as_fill(tmp_path):
    """Visual padding rows are never written (missing inner chunks); partial chunks padded with fill."""
    layout = small_layout("float32", lengths=(3, 4, 0, 2, 5))  # groups of 7, 2, 5 tokens in shards of 8
    payloads = random_payloads(layout)
    a = _write(tmp_path / "s.zarr", layout, payloads)
    sa = ShardArray.from_path(a / "visual_states")
    assert sa.chunks_per_shard == (1, 2, 3, 1)
    blob = (a / "visual_states" / sa.shard_key((0, 1, 0, 0))).read_bytes()  # group of 2 tokens
    chunks = _chunks(sa, blob)
    assert [c is None for c in chunks] == [False] * 3 + [True] * 3  # tokens 4..7: missing, all layers
    vis = zarr.open_array(a / "visual_states", mode="r")[...]
    assert (vis[:, 8 + 2 : 16] == 0).all() and (vis[:, 7:8] == 0).all() and (vis[:, 16 + 5 :] == 0).all()
    assert (vis[0, 8:10] != 0).all()


def test_fill_value_partial_shard_and_other_layouts(tmp_path):
    """A NaN fill, a big-endian inner chunk, index at the start, v2 keys, a partial edge shard."""
    data = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    nan_arr = zarr.create_array(tmp_path / "nan.zarr", shape=(10, 6), chunks=(2, 3), shards=(4, 6), dtype="float32",
                                fill_value=np.nan, compressors=[ZstdCodec(level=3, checksum=True)])
    sa = ShardArray.open(nan_arr)
    assert np.isnan(sa.fill_value)
    sa.write((0, 0), data[:3])  # 3 of 4 rows: the second row of chunks is padded with NaN
    sa.write((2, 0), data[8:10])  # the edge shard (rows 8..11 of a 10-row array)
    got = nan_arr[...]
    np.testing.assert_array_equal(got[:3], data[:3])
    np.testing.assert_array_equal(got[8:], data[8:])
    assert np.isnan(got[3:8]).all()

    big = zarr.create_array(
        tmp_path / "big.zarr", shape=(10, 6), chunks=(4, 6), dtype="int16", fill_value=7, compressors=None,
        serializer=ShardingCodec(chunk_shape=(2, 3), codecs=[BytesCodec(endian="big"), ZstdCodec()],
                                 index_location="start"),
        chunk_key_encoding={"name": "v2", "separator": "."},
    )
    sb = ShardArray.open(big)
    assert sb.shard_key((2, 0)) == "2.0" and sb.index_location == "start"
    ints = np.arange(60, dtype=np.int16).reshape(10, 6)
    sb.write((1, 0), ints[4:7, :3])  # chunks touching rows 4..6, columns 0..2 only
    sb.write((2, 0), ints[8:10])
    want = np.full((10, 6), 7, np.int16)
    want[4:7, :3], want[8:10] = ints[4:7, :3], ints[8:10]
    np.testing.assert_array_equal(big[...], want)
    assert sb.write((1, 0), ints[4:4]) == 0 and not (tmp_path / "big.zarr" / "1.0").exists()  # empty: no shard
    with pytest.raises(Exception, match="does not fit"):
        sb.write((2, 0), ints[6:10])  # runs past the array's end


def test_unsupported_layouts_refused_and_writer_falls_back(tmp_path, monkeypatch):
    gz = zarr.create_array(tmp_path / "gz.zarr", shape=(8,), chunks=(2,), shards=(4,), dtype="uint16",
                           compressors=[GzipCodec()])
    with pytest.raises(UnsupportedShardFormat, match="'gzip' is not supported"):
        ShardArray.open(gz)
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=(8,), chunks=(2,), dtype="uint16")
    with pytest.raises(UnsupportedShardFormat, match="sharding_indexed"):
        ShardArray.open(plain)
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), chunks=(2,), shards=(4,), dtype="uint16")
    with pytest.raises(UnsupportedShardFormat, match="local filesystem store"):
        ShardArray.open(mem)

    monkeypatch.setattr(writer_mod.codec, "state_codecs", lambda *a: [GzipCodec(level=1)])
    layout = small_layout("bfloat16")
    payloads = random_payloads(layout)
    path = tmp_path / "s.zarr"
    create(path, layout, {"model": {"id": "test"}}, META)
    with StoreWriter(path) as w:
        assert not w.direct and set(w.fallback) == set(STATES) and "gzip" in w.fallback["text_states"]
        for p in payloads:
            w.submit(p)
    ds = open_store(path)
    p = payloads[0]
    np.testing.assert_array_equal(ds.text_states.values[0, :2], codec.decode_bf16(p.text_states))


def test_failed_write_leaves_old_shard_and_no_temporary_file(tmp_path):
    layout = small_layout("float32")
    payloads = random_payloads(layout)
    path = _write(tmp_path / "s.zarr", layout, payloads)
    before = _shard_files(path, "text_states")
    sa = ShardArray.from_path(path / "text_states")
    calls = []

    def boom(block, sl, partial):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed mid-shard")
        return ShardArray._encode_chunk(sa, block, sl, partial)

    sa._encode_chunk = boom
    new = np.zeros((1, 2, 2, 3, 4), np.float32)
    with pytest.raises(RuntimeError, match="killed"):
        sa.write((0, 0, 0, 0, 0), new)
    assert _shard_files(path, "text_states") == before
    leftovers = [f for f in (path / "text_states").rglob("*") if f.name.endswith(".tmp")]
    assert leftovers == []


def test_wrong_payload_shape_refused_on_both_paths(tmp_path):
    layout = small_layout()
    for direct in (True, False):
        path = tmp_path / f"s{direct}.zarr"
        create(path, layout, {"model": {"id": "test"}}, META)
        bad = random_payloads(layout)[0]
        bad.text_states = bad.text_states[:, :, :1]
        with pytest.raises(Exception, match=r"must have shape \(<= 2, 2, 3, 4\)"):
            with StoreWriter(path, direct=direct) as w:
                w.submit(bad)
        assert not (path / "text_states" / "c").exists()


def test_roundtrip_helper_uses_direct_path(tmp_path):
    layout = small_layout("bfloat16")
    roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    with StoreWriter(tmp_path / "s.zarr") as w:
        assert {n: type(sa).__name__ for n, sa in w.direct.items()} == dict.fromkeys(STATES, "ShardArray")
    assert not any(name.endswith(".tmp") for _, _, files in os.walk(tmp_path) for name in files)
