"""Direct shard reads (store/shardread.py): every selection of arrays zarr-python wrote reads back as zarr
reads it; damaged bytes raise; the store reader uses it and still names a damaged chunk."""

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from gapcache.errors import DamagedChunkError, UnsupportedShardFormat
from gapcache.store import open_store, reader
from gapcache.store.shardread import ShardReader
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
    assert reader._direct_reader(plain) is None  # not sharded: zarr reads it


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
