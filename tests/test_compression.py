"""Hidden-state compression settings (store/codec.py): parsed in one place, validated by the config, written by
shardio byte for byte as zarr-python writes them, kept by merge; each shard's CRC-32C record taken while writing."""

import os
import sys

import numpy as np
import pytest
import zarr

from gapcache.config import DEMO, load_config
from gapcache.errors import ConfigError
from gapcache.store import StoreWriter, codec, create, open_store, shardio
from gapcache.store.checksums import file_crc32c
from gapcache.store.shardio import ShardArray
from gapcache.store.verify import verify
from helpers import random_payloads, small_layout

STATES = ("text_states", "visual_states")
META = {"question": np.array(["q"] * 5, dtype=object)}
SETTINGS = ["none", "zstd:1", "zstd:3", "blosc:lz4:5:bitshuffle", "blosc:lz4:9:bitshuffle:32768",
            "blosc:zstd:1:shuffle", "blosc:blosclz:3:noshuffle"]


def _layout(compression, dtype="bfloat16", **kw):
    base = small_layout(dtype, **kw)
    return type(base)(sample_ids=base.sample_ids, conditions=base.conditions, layers=base.layers, hidden=base.hidden,
                      model_dtype=dtype, candidates=base.candidates, visual_lengths=base.visual_lengths,
                      samples_per_shard=base.samples_per_shard, visual_chunk_tokens=base.visual_chunk_tokens,
                      compression=compression)


def _write(path, layout, payloads, direct=True):
    create(path, layout, {"model": {"id": "test"}}, META)
    with StoreWriter(path, direct=direct) as w:
        assert set(w.direct) == (set(STATES) if direct else set()), w.fallback
        for p in payloads:
            w.submit(p)
    return path


def _files(path, name):
    root = path / name
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != "zarr.json" and f.relative_to(root).parts[0] != "checksums"}


@pytest.mark.parametrize("spec, parts", [
    ("auto", ("auto",)), ("none", ("none",)), ("zstd:1", ("zstd", 1)), ("zstd:22", ("zstd", 22)),
    (0, ("none",)), (3, ("zstd", 3)),
    ("blosc:lz4:5:bitshuffle", ("blosc", "lz4", 5, "bitshuffle", 0)),
    ("blosc:zstd:1:shuffle:262144", ("blosc", "zstd", 1, "shuffle", 262144)),
])
def test_compression_settings_parse(spec, parts):
    assert codec.parse_compression(spec) == parts


@pytest.mark.parametrize("spec", ["zstd:0", "zstd:23", "zstd", "zstd:-1", "blosc:lz4:5", "blosc:lz4:0:shuffle",
                                  "blosc:lz4:10:shuffle", "blosc:snappy:1:shuffle", "blosc:lz4:5:byteshuffle",
                                  "blosc:lz4:5:shuffle:-1", "gzip:1", "", True, None, 1.0])
def test_bad_compression_settings_are_refused(spec):
    with pytest.raises(ValueError):
        codec.parse_compression(spec)


@pytest.mark.parametrize("spec", SETTINGS)
def test_compression_of_inverts_state_codecs(tmp_path, spec):
    """What merge reads back from an array's metadata is the setting it was created with."""
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(4, 8), chunks=(2, 8), shards=(4, 8), dtype="uint16",
                            compressors=codec.state_codecs(spec))
    inner = arr.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert codec.compression_of(inner) == spec


def test_blosc_typesize_is_the_storage_items():
    (bf16,) = codec.state_codecs("blosc:lz4:5:shuffle", 2)
    (f32,) = codec.state_codecs("blosc:lz4:5:shuffle", 4)
    assert (bf16.typesize, f32.typesize) == (2, 4)


def test_config_option_validated_and_out_of_the_default_hash():
    cfg = load_config(DEMO)
    assert cfg.extract.compression is None
    assert cfg.hash() == "6626e1676c66d8f9"  # the demo config's hash of round 1
    assert load_config({**DEMO, "extract": {**DEMO["extract"], "compression": None}}).hash() == cfg.hash()
    blosc = load_config({**DEMO, "extract": {**DEMO["extract"], "compression": "blosc:lz4:5:bitshuffle"}})
    assert blosc.extract.compression == "blosc:lz4:5:bitshuffle" and blosc.hash() != cfg.hash()
    for bad in ("lz4", "zstd:0", 1):
        with pytest.raises(ConfigError, match=r"The 'extract.compression' parameter must be null or one of "
                                              rf"\['auto', 'none', 'zstd:<level 1..22>', .*Got {bad!r} instead"):
            load_config({**DEMO, "extract": {**DEMO["extract"], "compression": bad}})


def test_layout_refuses_a_bad_setting_and_defaults_to_the_level():
    with pytest.raises(ConfigError, match="compression of a Layout: 'blosc:lz4' is not a compression setting"):
        _layout("blosc:lz4")
    assert _layout("none").state_compression == "none"
    assert _layout("zstd:1", "float32").state_compression == "zstd:1"  # what is asked for, whatever the dtype
    base = small_layout("bfloat16")
    for level, want in ((0, "none"), (3, "zstd:3"), (1, "zstd:1")):  # the old compression_level; 1 (default) = auto
        assert type(base)(**{**_fields(base), "compression_level": level}).state_compression == want


@pytest.mark.parametrize("dtype, want", [("bfloat16", "zstd:1"), ("float16", "zstd:1"),
                                         ("float32", "blosc:lz4:5:shuffle")])
@pytest.mark.parametrize("compression", [None, "auto"])
def test_auto_resolves_by_the_stored_item_size(dtype, want, compression):
    """The default (compression null, compression_level 1) and "auto": zstd 1 for 2-byte items, blosc lz4 with byte
    shuffle for float32, whose zstd frames keep ~0.92 of the bytes for twice blosc's CPU (store/codec.py)."""
    assert _layout(compression, dtype).state_compression == want
    assert codec.resolve_compression("auto", codec.storage_for(dtype)[0].itemsize) == want
    assert codec.resolve_compression(0, 4) == "none" and codec.resolve_compression(2, 2) == "zstd:2"


@pytest.mark.parametrize("dtype, name", [("bfloat16", "zstd"), ("float32", "blosc")])
def test_a_default_store_records_the_concrete_codec(tmp_path, dtype, name):
    """The arrays' metadata hold the codec auto chose (what any Zarr v3 reader needs), never "auto"; values read
    back."""
    layout = _layout(None, dtype)
    payloads = random_payloads(layout, seed=5)
    path = _write(tmp_path / "s.zarr", layout, payloads)
    for state in STATES:
        inner = zarr.open_array(path / state, mode="r").metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert [c["name"] for c in inner][1:] == [name]
        assert codec.compression_of(inner) == layout.state_compression
    got = open_store(path).text_states.values[0, :2]
    np.testing.assert_array_equal(got, codec.decode(payloads[0].text_states, codec.storage_for(dtype)[1]))
    assert verify(path).ok


def _fields(layout):
    from dataclasses import fields

    return {f.name: getattr(layout, f.name) for f in fields(layout) if f.init}


@pytest.mark.parametrize("spec", SETTINGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_direct_shards_are_the_inner_chunks_zarr_writes(tmp_path, spec, dtype):
    """Every setting: shardio's inner chunks equal zarr-python's, byte for byte; values read back; verify passes."""
    layout = _layout(spec, dtype)
    payloads = random_payloads(layout, seed=4)
    a = _write(tmp_path / "direct.zarr", layout, payloads)
    b = _write(tmp_path / "zarr.zarr", layout, payloads, direct=False)
    for name in STATES:
        sa = ShardArray.from_path(a / name)
        assert [n for n, _ in sa.bytes_codecs] == ([] if spec == "none" else [spec.split(":")[0]])
        files_a, files_b = _files(a, name), _files(b, name)
        assert files_a.keys() == files_b.keys()
        for key in files_a:
            assert _chunks(sa, files_a[key]) == _chunks(sa, files_b[key]), (name, key)
        np.testing.assert_array_equal(zarr.open_array(a / name, mode="r")[...], zarr.open_array(b / name, mode="r")[...])
    got = open_store(a).text_states.values[0, :2]
    np.testing.assert_array_equal(got, codec.decode(payloads[0].text_states, codec.storage_for(dtype)[1]))
    rep = verify(a)
    assert rep.ok, rep.problems


def _chunks(sa, blob):
    n = sa.index_nbytes
    oal = np.frombuffer(blob[-n:][: 16 * (n // 16)], dtype=sa.index_dtype).reshape(-1, 2)
    return [None if o == shardio.MISSING else blob[int(o): int(o) + int(k)] for o, k in oal]


@pytest.mark.parametrize("spec", ["none", "zstd:1", "blosc:lz4:5:bitshuffle"])
def test_staged_crc_is_the_files_crc(tmp_path, spec):
    """The CRC-32C taken over the bytes as written is the CRC-32C of the shard file (its checksum record)."""
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(1, 8, 3, 64), chunks=(1, 4, 1, 64), shards=(1, 8, 3, 64),
                            dtype="uint16", compressors=codec.state_codecs(spec))
    block = np.random.default_rng(0).integers(0, 2**16, (1, 7, 3, 64), dtype=np.uint16)  # a padded chunk too
    staged = ShardArray.open(arr).stage((0, 0, 0, 0), block)
    try:
        assert staged.crc == file_crc32c(staged.tmp) and staged.crc[1] == staged.nbytes
    finally:
        staged.commit()
    np.testing.assert_array_equal(arr[:, :7], block)


def test_staged_crc_left_to_the_file_when_the_index_comes_first(tmp_path):
    from zarr.codecs import BytesCodec, ShardingCodec

    arr = zarr.create_array(tmp_path / "s.zarr", shape=(8,), chunks=(8,), dtype="uint16", compressors=None,
                            serializer=ShardingCodec(chunk_shape=(2,), codecs=[BytesCodec()], index_location="start"))
    staged = ShardArray.open(arr).stage((0,), np.arange(8, dtype=np.uint16))
    assert staged.crc is None
    staged.abort()


def test_merge_keeps_the_compression(tmp_path):
    from gapcache.store.merge import merge

    spec = "blosc:lz4:9:bitshuffle:32768"
    a = _write(tmp_path / "a.zarr", _layout(spec), random_payloads(_layout(spec), seed=1))
    base = small_layout("bfloat16")
    other = type(base)(sample_ids=tuple(f"t{i}" for i in range(5)), conditions=base.conditions, layers=base.layers,
                       hidden=base.hidden, model_dtype="bfloat16", candidates=base.candidates,
                       visual_lengths=base.visual_lengths, samples_per_shard=2, visual_chunk_tokens=4,
                       compression=spec)
    b = _write(tmp_path / "b.zarr", other, random_payloads(other, seed=2))
    m = merge([a, b], tmp_path / "m.zarr")
    for name in STATES:
        inner = zarr.open_array(m / name, mode="r").metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert codec.compression_of(inner) == spec


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_early_writeback_is_available_on_linux(tmp_path):
    assert shardio._SYNC_FILE_RANGE is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        assert shardio._SYNC_FILE_RANGE(fd, 0, 8192, shardio._SYNC_FILE_RANGE_WRITE) == 0
        assert shardio._SYNC_FILE_RANGE(-1, 0, 8192, shardio._SYNC_FILE_RANGE_WRITE) == -1  # a bad fd: an error
    finally:
        os.close(fd)


@pytest.mark.parametrize("spec", ["none", "zstd:1", "blosc:lz4:5:bitshuffle"])
def test_direct_io_and_buffered_shard_files_are_identical(tmp_path, spec):
    """O_DIRECT (aligned blocks, padded tail truncated) and page-cache writes leave the same bytes, checksums and records."""
    layout = _layout(spec, lengths=(64, 60, 0, 33, 65), spc=2)  # visual shards of several inner chunks, padded ones
    payloads = random_payloads(layout, seed=5)
    stores = {}
    for direct_io in (True, False):
        path = tmp_path / f"{direct_io}.zarr"
        create(path, layout, {"model": {"id": "test"}}, META)
        with StoreWriter(path, direct_io=direct_io) as w:
            assert all(sa.direct_io is direct_io for sa in w.direct.values())
            for p in payloads:
                w.submit(p)
        stores[direct_io] = path
    for name in STATES:
        assert _files(stores[True], name) == _files(stores[False], name)
        records = [sorted((p.name, p.read_text()) for p in (s / name / "checksums").iterdir()) for s in stores.values()]
        assert records[0] == records[1]
    assert verify(stores[True]).ok


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    """EINVAL on an O_DIRECT open (tmpfs, some network filesystems): the shard is written buffered, and so are the next."""
    import errno

    real_open, tried = os.open, []

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    arr = zarr.create_array(tmp_path / "a.zarr", shape=(3, 64), chunks=(1, 64), shards=(1, 64), dtype="uint16",
                            compressors=codec.state_codecs("zstd:1"))
    sa = ShardArray.open(arr)
    monkeypatch.setattr(shardio.os, "open", no_direct)
    data = np.arange(3 * 64, dtype=np.uint16).reshape(3, 64)
    for i in range(3):
        sa.write((i, 0), data[i : i + 1])
    monkeypatch.undo()
    assert sa.direct_io is False and len(tried) == (1 if shardio._O_DIRECT else 0)
    np.testing.assert_array_equal(arr[...], data)
    assert not list((tmp_path / "a.zarr").rglob("*.tmp"))
