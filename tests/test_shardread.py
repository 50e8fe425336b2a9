"""Direct shard reads (store/shardread.py): every selection of arrays zarr-python wrote reads back as zarr
reads it; damaged bytes raise; the store reader uses it and still names a damaged chunk."""

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from gapcache.errors import DamagedChunkError, UnsupportedShardFormat
from gapcache.store import open_store, reader
from gapcache.store.shardread import ChunkReader, ShardReader
from helpers import random_payloads, roundtrip, small_layout

LAYOUTS = {
    "zstd-end-crc": dict(codecs=[BytesCodec(), ZstdCodec(level=1)], index_codecs=[BytesCodec(), Crc32cCodec()]),
    "none-start": dict(codecs=[BytesCodec()], index_codecs=[BytesCodec(), Crc32cCodec()], index_location="start"),
    "blosc-crc": dict(codecs=[BytesCodec(), BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
                      index_codecs=[BytesCodec()]),
    "big-endian": dict(codecs=[BytesCodec(endian="big"), ZstdCodec(level=3)],
                       index_codecs=[BytesCodec(endian="big"), Crc32cCodec()]),
}


def _array(path, layout: str, dtype="float32", shape=(3, 70, 4, 6), shards=(1, 32, 4, 6), chunks=(1, 8, 2, 6),
           fill=0.0):
    sharding = ShardingCodec(chunk_shape=chunks, **LAYOUTS[layout])
    arr = zarr.create_array(str(path), shape=shape, dtype=dtype, chunks=shards, serializer=sharding,
                            fill_value=fill, compressors=None)
    rng = np.random.default_rng(0)
    values = rng.normal(size=shape).astype(dtype) if np.dtype(dtype).kind == "f" else \
        rng.integers(-50, 50, size=shape).astype(dtype)
    values[0, 40:70] = fill  # whole inner chunks of fill value: zarr leaves them out of the index
    arr[...] = values
    arr[2, 64:70] = fill  # the partial last shard of condition 2 holds only fill value: no file at all
    return zarr.open_array(str(path), mode="r")


def _selections(shape, n=60, seed=1):
    rng = np.random.default_rng(seed)
    out = [tuple(slice(None) for _ in shape), (0,), (slice(0, 1), slice(0, 32), 2), (Ellipsis, 3), (1, Ellipsis, 0)]
    for _ in range(n):
        key = []
        for size in shape:
            lo = int(rng.integers(0, size))
            hi = int(rng.integers(lo, size + 1))
            key.append(slice(lo, hi) if rng.random() < 0.8 else (lo - size if rng.random() < 0.2 else lo))
        out.append(tuple(key))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "uint16", "int64"])
def test_every_selection_reads_as_zarr_reads_it(tmp_path, layout, dtype):
    arr = _array(tmp_path / "a.zarr", layout, dtype, fill=0 if dtype != "float32" else 0.0)
    direct = ShardReader.open(arr)
    for key in _selections(arr.shape):
        got, want = direct[key], arr[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=str(key))


def test_missing_chunks_and_shards_read_as_a_nonzero_fill_value(tmp_path):
    arr = _array(tmp_path / "a.zarr", "zstd-end-crc", fill=-7.5)
    direct = ShardReader.open(arr)
    np.testing.assert_array_equal(direct[2, 64:70], np.full((6, 4, 6), -7.5, np.float32))
    np.testing.assert_array_equal(direct[...], arr[...])


def test_selections_it_does_not_take_and_other_stores_are_refused(tmp_path):
    arr = _array(tmp_path / "a.zarr", "zstd-end-crc")
    direct = ShardReader.open(arr)
    for key in [(slice(0, 3, 2),), (np.array([0, 2]),), (None, 0), (Ellipsis, 0, Ellipsis)]:
        with pytest.raises(UnsupportedShardFormat):
            direct[key]
    with pytest.raises(IndexError, match="out of bounds for axis 0 with size 3"):
        direct[3]
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="int8", chunks=(4,), shards=(4,))
    with pytest.raises(UnsupportedShardFormat, match="MemoryStore"):
        ShardReader.open(mem)
    assert reader._direct_reader(mem) is None
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4,), dtype="int8", chunks=(2,))
    assert isinstance(reader._direct_reader(plain), ChunkReader)  # not sharded: read chunk by chunk
    with pytest.raises(UnsupportedShardFormat, match="sharded"):
        ChunkReader.open(arr)
    mem_plain = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="int8", chunks=(2,))
    assert reader._direct_reader(mem_plain) is None


def _flip(path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where", ["chunk", "index", "truncated"])
def test_damaged_bytes_raise_value_error_naming_the_shard(tmp_path, where):
    arr = _array(tmp_path / "a.zarr", "blosc-crc")
    shard = tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0"
    if where == "chunk":
        _flip(shard, 3)
    elif where == "index":
        _flip(shard, shard.stat().st_size - 5)
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard .*c/1/0/0/0"):
        ShardReader.open(arr)[1]
    with pytest.raises(Exception):  # zarr refuses the same bytes too
        arr[1]


def test_open_store_reads_directly_and_names_a_damaged_chunk(tmp_path, monkeypatch):
    layout = small_layout("bfloat16")
    path = tmp_path / "s.zarr"
    ds = roundtrip(path, layout, random_payloads(layout, seed=3))
    ref = {n: ds[n].values for n in ("text_states", "visual_states")}
    calls = []
    real = ShardReader.__getitem__
    monkeypatch.setattr(ShardReader, "__getitem__", lambda self, key: calls.append(key) or real(self, key))
    for name, want in ref.items():
        got = open_store(path)[name].values
        np.testing.assert_array_equal(got, want)
    assert calls, "open_store did not read through the direct shard reader"
    monkeypatch.setattr(reader, "_direct_reader", lambda arr: None)  # zarr-python: the same values
    for name, want in ref.items():
        np.testing.assert_array_equal(open_store(path)[name].values, want)
    monkeypatch.undo()
    shard = next(p for p in sorted((path / "text_states" / "c").rglob("*")) if p.is_file())
    _flip(shard, 2)
    with pytest.raises(DamagedChunkError, match="text_states"):
        open_store(path).text_states.values


CHUNKED = {  # the codec chains of the store's unsharded arrays, and others a store may carry
    "zstd-crc": dict(compressors=[ZstdCodec(level=0), Crc32cCodec()]),
    "none": dict(compressors=None),
    "blosc": dict(compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]),
    "big-endian": dict(serializer=BytesCodec(endian="big"), compressors=[ZstdCodec(level=3)]),
    "dot-keys": dict(compressors=[ZstdCodec(level=0), Crc32cCodec()],
                     chunk_key_encoding={"name": "default", "separator": "."}),
    "v2-keys": dict(compressors=[Crc32cCodec()], chunk_key_encoding={"name": "v2", "separator": "."}),
}


def _chunked(path, codecs: str, dtype, shape=(3, 70, 5), chunks=(1, 32, 5), fill=0):
    kw = {**CHUNKED[codecs]}
    if dtype is str:
        kw.pop("serializer", None)
    arr = zarr.create_array(str(path), shape=shape, dtype=dtype, chunks=chunks, fill_value=fill, **kw)
    rng = np.random.default_rng(0)
    if dtype is str:
        values = np.array([f"s{i}" * (i % 4) for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    elif np.dtype(dtype).kind == "b":
        values = rng.random(shape) < 0.5
    elif np.dtype(dtype).kind == "f":
        values = rng.normal(size=shape).astype(dtype)
    else:
        values = rng.integers(-50, 50, size=shape).astype(dtype)
    arr[...] = values
    arr[2, 64:70] = fill  # written: fill-valued chunks are not stored (write_empty_chunks off)
    return zarr.open_array(str(path), mode="r")


@pytest.mark.parametrize("codecs", sorted(CHUNKED))
@pytest.mark.parametrize("dtype", ["float32", "int64", "uint8", "bool", str])
def test_every_selection_of_a_chunked_array_reads_as_zarr_reads_it(tmp_path, codecs, dtype):
    fill = {str: "", "bool": False, "uint8": 3}.get(dtype, -3)
    arr = _chunked(tmp_path / "a.zarr", codecs, dtype, fill=fill)
    direct = ChunkReader.open(arr)
    for key in _selections(arr.shape):
        got, want = direct[key], arr[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=str(key))


@pytest.mark.parametrize("fill", [-7.5, float("nan")])
def test_a_chunked_arrays_missing_chunks_read_as_its_fill_value(tmp_path, fill):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 10), dtype="float32", chunks=(1, 4), fill_value=fill,
                            compressors=[ZstdCodec(level=0), Crc32cCodec()])
    arr[0, 4:8] = 1.0  # one chunk stored; the other five are absent
    direct = ChunkReader.open(arr)
    want = np.full((2, 10), fill, np.float32)
    want[0, 4:8] = 1.0
    np.testing.assert_array_equal(direct[...], want)  # (NaN equals NaN here)
    np.testing.assert_array_equal(direct[...], arr[...])


def test_a_damaged_chunk_file_raises_value_error_naming_it(tmp_path):
    arr = _chunked(tmp_path / "a.zarr", "zstd-crc", "int64")
    chunk = tmp_path / "a.zarr" / "c" / "1" / "1" / "0"
    _flip(chunk, 3)
    with pytest.raises(ValueError, match=r"chunk .*c/1/1/0 fails its CRC-32C"):
        ChunkReader.open(arr)[1]
    np.testing.assert_array_equal(ChunkReader.open(arr)[0], arr[0])  # the other chunks still read
    chunk.write_bytes(b"")
    with pytest.raises(ValueError, match=r"c/1/1/0"):
        ChunkReader.open(arr)[1]


def test_read_whole_reads_plain_store_variables_in_one_call_and_leaves_the_rest(tmp_path, monkeypatch):
    from gapcache.analyze.pipeline import preload_small

    layout = small_layout("float16")
    path = tmp_path / "s.zarr"
    roundtrip(path, layout, random_payloads(layout, seed=5))
    ds = open_store(path)
    reads = []
    real = ChunkReader.__getitem__
    monkeypatch.setattr(ChunkReader, "__getitem__", lambda self, key: reads.append(key) or real(self, key))
    got = reader.read_whole(ds["gold_logprob"].data)
    assert reads == [Ellipsis]  # one read of every chunk, not one per chunk
    np.testing.assert_array_equal(got, zarr.open_array(str(path / "gold_logprob"), mode="r")[...])
    assert reader.read_whole(ds["gold_logprob"].data[:, 1:]) is None  # a slice: not a plain variable
    assert reader.read_whole(ds["text_states"].data) is None  # decoded hidden states: read their own way
    assert reader.read_whole(np.zeros(3)) is None
    pre = preload_small(ds)
    for name in ("gold_logprob", "status", "visual_length", "question"):
        np.testing.assert_array_equal(pre[name].values, open_store(path)[name].values)
        assert pre[name].data.chunks == ds[name].data.chunks
    monkeypatch.undo()
    chunk = next(p for p in sorted((path / "gold_logprob" / "c").rglob("*")) if p.is_file())
    _flip(chunk, 2)
    ds = open_store(path)
    assert reader.read_whole(ds["gold_logprob"].data) is None  # damaged: left to the per-chunk read ...
    key = str(chunk.relative_to(path / "gold_logprob"))
    with pytest.raises(DamagedChunkError, match=f"gold_logprob.*{key}"):  # ... which names the chunk
        preload_small(ds)
