"""Read a basic selection of a sharded Zarr v3 array of a local store straight from its shard files.

zarr-python decodes every inner chunk through its async codec pipeline, ~0.5 ms of fixed cost per chunk
(measured on the demo store: one (1, 3072, 1, 128) layer of a token-span shard, 48 inner chunks of 32 KB, took
29 ms through ``zarr.Array.__getitem__`` and 2.3 ms from the file; every block of the demo's three state arrays:
6.8-9.6x, ``benchmarks/bench_read.py``). The analysis reads whole layers of whole
shards, so that fixed cost was most of its reading time. This module reads the same bytes the same way the
Zarr v3 spec (``sharding_indexed``) and zarr-python do, for the layouts :class:`gapcache.store.shardio.ShardArray`
parses (anything else is refused with :class:`UnsupportedShardFormat`, and the caller reads through zarr):

* the shard index (at the end or the start of the file) decoded with the index codecs, its CRC-32C checked;
* each inner chunk the selection touches read with one ``pread``, its codecs undone in reverse order
  (``crc32c``: the trailing checksum checked and stripped; ``zstd`` / ``blosc``: numcodecs' decoders), then the
  ``bytes`` codec's byte order;
* a missing shard file or a missing inner chunk (``2**64 - 1`` in the index) reads as the fill value.

Damaged bytes raise ``ValueError`` naming the shard file and the inner chunk (what zarr's codecs raise too, so
``gapcache.store.reader`` turns both into the same :class:`gapcache.errors.DamagedChunkError`).

:class:`ChunkReader` does the same for the unsharded arrays (one file per chunk; ``bytes`` or ``vlen-utf8`` first).

Usage::

    from gapcache.store.shardread import ChunkReader, ShardReader
    r = ShardReader.open(zarr_array)          # UnsupportedShardFormat unless local and sharded
    block = r[0:1, 0:3072, 2:3, :]            # == zarr_array[0:1, 0:3072, 2:3, :]
    status = ChunkReader.open(group["status"])[...]   # unsharded arrays of a local store
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from gapcache.errors import UnsupportedShardFormat
from gapcache.store.shardio import (
    MISSING, SUPPORTED_DTYPES, ShardArray, _endian, _named, _parse_fill, bytes_codec, chunk_key, crc32c, key_encoding,
    local_dir,
)


def _bounds(key, shape) -> tuple[list[tuple[int, int]], list[int]]:
    """((start, stop) per axis, the axes an integer drops) of a basic selection with unit steps; anything else
    (fancy indexing, steps, new axes) raises UnsupportedShardFormat."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) == 1:
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1 :]
    if len(key) > len(shape):
        raise UnsupportedShardFormat(f"a selection of {len(key)} axes on an array of {len(shape)}")
    key = key + (slice(None),) * (len(shape) - len(key))
    out, dropped = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise UnsupportedShardFormat(f"a slice of step {step}")
            out.append((start, max(start, stop)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + n if int(k) < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of bounds for axis {axis} with size {n}")
            out.append((i, i + 1))
            dropped.append(axis)
        else:
            raise UnsupportedShardFormat(f"a selection by {type(k).__name__}")
    return out, dropped


class ShardReader:
    """Reads basic selections of one sharded array of a local store, as zarr-python would return them."""

    def __init__(self, sa: ShardArray):
        self.sa = sa
        self.shape, self.dtype = sa.shape, sa.dtype.newbyteorder("=")

    @classmethod
    def open(cls, array) -> ShardReader:
        """The reader of a zarr-python ``Array`` of a local filesystem store (read-only is fine)."""
        array_dir = local_dir(array, "reads")
        if not hasattr(os, "pread"):
            raise UnsupportedShardFormat("Direct shard reads need os.pread (POSIX).")
        return cls(ShardArray.from_path(array_dir))

    def __getitem__(self, key) -> np.ndarray:
        sa = self.sa
        bounds, dropped = _bounds(key, self.shape)
        out = np.empty([b - a for a, b in bounds], dtype=self.dtype)
        shards = [range(a // s, -(-b // s)) for (a, b), s in zip(bounds, sa.shard_shape)]
        for coords in itertools.product(*shards) if out.size else ():
            origin = [c * s for c, s in zip(coords, sa.shard_shape)]
            # the selection within this shard, shard-relative
            lo = [max(a, o) - o for (a, _), o in zip(bounds, origin)]
            hi = [min(b, o + s) - o for (_, b), o, s in zip(bounds, origin, sa.shard_shape)]
            self._read_shard(coords, lo, hi, out, [o + l - a for o, l, (a, _) in zip(origin, lo, bounds)])
        return out.squeeze(axis=tuple(dropped))

    def _read_shard(self, coords, lo, hi, out, at) -> None:
        """Fill ``out`` at offset ``at`` with the shard-relative box [lo, hi) of the shard at ``coords``."""
        sa = self.sa
        path = sa.shard_path(coords)
        box = tuple(slice(a, a + h - l) for a, l, h in zip(at, lo, hi))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            out[box] = sa.fill_value
            return
        try:
            index = self._index(fd, path)
            chunks = [range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, sa.chunk_shape)]
            for idx in itertools.product(*chunks):
                c0 = [i * c for i, c in zip(idx, sa.chunk_shape)]
                src = tuple(slice(max(l, s) - s, min(h, s + c) - s)
                            for l, h, s, c in zip(lo, hi, c0, sa.chunk_shape))
                dst = tuple(slice(a + max(l, s) - l, a + min(h, s + c) - l)
                            for a, l, h, s, c in zip(at, lo, hi, c0, sa.chunk_shape))
                offset, nbytes = (int(v) for v in index[idx])
                if offset == MISSING and nbytes == MISSING:
                    out[dst] = sa.fill_value
                else:
                    out[dst] = self._chunk(fd, path, idx, offset, nbytes)[src]
        finally:
            os.close(fd)

    def _index(self, fd: int, path: Path) -> np.ndarray:
        """The shard's (*chunks_per_shard, 2) uint64 index, its CRC-32C checked."""
        sa = self.sa
        size = os.fstat(fd).st_size
        n = sa.index_nbytes
        if size < n:
            raise ValueError(f"shard {path} is {size} bytes, shorter than its {n}-byte index")
        raw = os.pread(fd, n, size - n if sa.index_location == "end" else 0)
        body = raw[: n - 4] if sa.index_crc else raw
        if sa.index_crc and crc32c(body) != int(np.frombuffer(raw[n - 4 :], "<u4")[0]):
            raise ValueError(f"shard {path}: the index's CRC-32C does not match")
        index = np.frombuffer(body, dtype=sa.index_dtype).reshape(sa.chunks_per_shard + (2,))
        ends = index[..., 0].astype(np.float64) + index[..., 1]
        present = index[..., 0] != MISSING
        if np.any(ends[present] > size):
            raise ValueError(f"shard {path}: its index points past the end of the file ({size} bytes)")
        return index

    def _chunk(self, fd: int, path: Path, idx, offset: int, nbytes: int) -> np.ndarray:
        """One inner chunk, decoded to its chunk shape in native byte order."""
        sa = self.sa
        buf = os.pread(fd, nbytes, offset)
        if len(buf) != nbytes:
            raise ValueError(f"shard {path}: inner chunk {idx} is cut short ({len(buf)} of {nbytes} bytes)")
        buf = undo_bytes_codecs(buf, sa.bytes_codecs, f"shard {path}: inner chunk {idx}")
        if memoryview(buf).nbytes != sa.chunk_nbytes:
            raise ValueError(f"shard {path}: inner chunk {idx} decodes to {memoryview(buf).nbytes} bytes, "
                             f"expected {sa.chunk_nbytes}")
        arr = np.frombuffer(buf, dtype=sa.dtype).reshape(sa.chunk_shape)
        return arr if sa.dtype.isnative else arr.astype(self.dtype)


def undo_bytes_codecs(buf, codecs, where: str):
    """Undo (name, numcodecs codec or None for crc32c) bytes-to-bytes codecs, last first: a crc32c's trailing
    checksum is checked and stripped (ValueError naming ``where`` if it does not match), the others decoded."""
    for _name, impl in reversed(codecs):
        if impl is None:  # crc32c
            body, tail = memoryview(buf)[:-4], bytes(memoryview(buf)[-4:])
            if len(tail) != 4 or crc32c(body) != int(np.frombuffer(tail, "<u4")[0]):
                raise ValueError(f"{where} fails its CRC-32C")
            buf = body
        else:
            buf = impl.decode(buf)
    return buf


class ChunkReader:
    """Reads basic selections of one unsharded Zarr v3 array of a local store straight from its chunk files, as
    zarr-python would return them: the per-sample, per-unit and whole-store arrays (``bytes`` or ``vlen-utf8``,
    then zstd / blosc / crc32c). Each chunk is one file read and its codecs undone in reverse order; a missing
    chunk file reads as the fill value.

    A 10,000-sample store's small arrays are ~7,200 chunks: the analysis' preload of them took 6.4 s through
    zarr-python (a dask task per chunk) and 0.28 s with this reader and one read per variable
    (``benchmarks/bench_preload.py``)."""

    def __init__(self, array_dir, meta: dict):
        self.dir = Path(array_dir)
        where = f"array {self.dir}"
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise UnsupportedShardFormat(f"{where}: not a plain Zarr v3 array.")
        grid, grid_cfg = _named(meta.get("chunk_grid"))
        codecs = list(meta.get("codecs") or [])
        first = _named(codecs[0])[0] if codecs else None
        dtype_name = meta.get("data_type")
        if grid != "regular" or first not in ("bytes", "vlen-utf8"):
            raise UnsupportedShardFormat(f"{where}: chunk grid {grid!r} and first codec {first!r}; expected a "
                                         "'regular' grid and 'bytes' or 'vlen-utf8'.")
        self.shape = tuple(int(x) for x in meta["shape"])
        self.chunk_shape = tuple(int(x) for x in grid_cfg["chunk_shape"])
        if first == "vlen-utf8":
            if dtype_name != "string":
                raise UnsupportedShardFormat(f"{where}: 'vlen-utf8' on data type {dtype_name!r}.")
            from numcodecs import VLenUTF8

            self.strings, self.dtype = VLenUTF8(), np.dtypes.StringDType()  # what zarr-python returns (numpy 2)
            self.fill_value = meta.get("fill_value") or ""
            base = np.dtype(np.uint8)
        else:
            if dtype_name not in SUPPORTED_DTYPES:
                raise UnsupportedShardFormat(f"{where}: data type {dtype_name!r} is not supported.")
            base = np.dtype(dtype_name)
            self.strings, self.dtype = None, base.newbyteorder(_endian(_named(codecs[0])[1], base, "array"))
            self.fill_value = _parse_fill(meta.get("fill_value"), base)
        self.out_dtype = self.dtype if self.strings is not None else self.dtype.newbyteorder("=")
        self.bytes_codecs = [bytes_codec(c, base, where) for c in codecs[1:]]
        self._prefix, self._sep = key_encoding(meta, where)

    @classmethod
    def open(cls, array) -> ChunkReader:
        """The reader of an unsharded zarr-python ``Array`` of a local filesystem store."""
        if array.shards is not None:
            raise UnsupportedShardFormat(f"Array {array.path!r} is sharded: read it with ShardReader.")
        return cls(local_dir(array, "reads"), array.metadata.to_dict())

    def __getitem__(self, key) -> np.ndarray:
        bounds, dropped = _bounds(key, self.shape)
        out = np.empty([b - a for a, b in bounds], dtype=self.out_dtype)
        grid = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, self.chunk_shape)]
        for idx in itertools.product(*grid) if out.size else ():
            c0 = [i * c for i, c in zip(idx, self.chunk_shape)]
            src = tuple(slice(max(a, s) - s, min(b, s + c) - s) for (a, b), s, c in zip(bounds, c0, self.chunk_shape))
            dst = tuple(slice(max(a, s) - a, min(b, s + c) - a) for (a, b), s, c in zip(bounds, c0, self.chunk_shape))
            chunk = self._chunk(idx)
            out[dst] = self.fill_value if chunk is None else chunk[src]
        return out.squeeze(axis=tuple(dropped))

    def _chunk(self, idx) -> np.ndarray | None:
        """The chunk at grid ``idx`` decoded to the chunk shape, or None where its file is absent."""
        path = self.dir.joinpath(*chunk_key(idx, self._prefix, self._sep).split("/"))
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            return None
        buf = undo_bytes_codecs(buf, self.bytes_codecs, f"chunk {path}")
        n = int(np.prod(self.chunk_shape))
        if self.strings is None and memoryview(buf).nbytes % self.dtype.itemsize:
            raise ValueError(f"chunk {path} decodes to {memoryview(buf).nbytes} bytes, not whole {self.dtype} items")
        arr = self.strings.decode(buf) if self.strings is not None else np.frombuffer(buf, dtype=self.dtype)
        if arr.size != n:
            raise ValueError(f"chunk {path} decodes to {arr.size} values, expected {n}")
        return arr.reshape(self.chunk_shape)
