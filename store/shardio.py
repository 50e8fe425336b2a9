"""Write whole Zarr v3 shards straight to a local store, in the ``sharding_indexed`` format.

zarr-python's write path costs several full copies of a shard, an "is this chunk all fill
value" scan of every inner chunk and single-threaded compression; gapcache always writes whole
shards, so it encodes them itself (Zarr v3 spec, ``sharding_indexed`` codec) and writes each
shard file with one sequential write. Everything is read from the array's own ``zarr.json``
(shape, data type, fill value, shard and inner chunk shapes, codecs, chunk key encoding); a
layout this module does not implement is refused with :class:`UnsupportedShardFormat`, and the
caller falls back to zarr-python.

Usage::

    sa = ShardArray.open(zarr_array)          # or ShardArray.from_path("store.zarr/text_states")
    sa.write((c, s, 0, 0, 0), block)          # block sits at the shard's origin

Shard file layout (spec): the encoded inner chunks, here in C order of the shard's chunk grid,
then (``index_location = "end"``) the index: for every inner chunk in C order an
``(offset, nbytes)`` pair of uint64 (``2**64 - 1`` twice for a missing chunk) encoded with the
index codecs (``bytes`` little endian, then ``crc32c`` appending the little-endian CRC-32C of
the index bytes). Inner chunks are encoded with the inner codecs: ``bytes`` (endian), then any
of ``zstd`` (numcodecs' Zstd, the same standard zstd frames zarr-python writes), ``blosc``
(numcodecs' Blosc with the array's typesize, cname, clevel, shuffle and blocksize: the same
frames zarr-python's BloscCodec writes) and ``crc32c``.

A write replaces the whole shard: elements of the shard outside ``block`` are fill value
afterwards (inner chunks it does not touch are missing; an inner chunk it covers in part is
padded with the fill value, as zarr-python pads edge chunks). Unlike zarr-python with
``write_empty_chunks=False``, an inner chunk that happens to hold only fill values is still
written (no scan); it reads back the same.

Atomic and durable: the shard goes to a hidden temporary file in the shard's directory, which
is fsynced, then renamed over the shard key (``os.replace``), then the directory is fsynced. A
process killed at any point leaves either the old shard or the new one, never a torn one (at
worst a stray ``.<name>.<pid>@<host>.<hex>.tmp`` file, which no Zarr reader looks at).

At disk speed: where the filesystem allows it (Linux ``O_DIRECT``; ``ShardArray.direct_io``),
the shard file is written past the page cache: the encoded chunks are gathered into one
page-aligned 8 MB buffer the device reads directly, in whole 4 KiB-aligned blocks (the last one
zero-padded, then the file truncated to its size). This spares the kernel's copy into the page
cache and its later writeback, which on a small node cost more CPU than the disk takes time.
Otherwise (EINVAL from the filesystem: tmpfs, some network filesystems) the file is written
buffered, and the disk is started on it while the shard is still being encoded (Linux
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after every ~8 MB: asynchronous writeback, no
durability promise). Either way the fsync before the rename stays, and the CRC-32C of the whole
shard file (``StagedShard.crc``: its checksum record) is computed over the bytes as they are
written, not by reading the file back.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from gapcache.errors import DirectIORefused, StoreError, UnsupportedShardFormat
from gapcache.store.checksums import crc32c_update
from gapcache.store.locks import tmp_name

MISSING = 2**64 - 1
#: bytes->bytes codecs this module can apply to an inner chunk
SUPPORTED_BYTES_CODECS = ("zstd", "blosc", "crc32c")
#: the blosc codec's shuffle names (Zarr v3) -> numcodecs' constants
BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
#: numeric Zarr v3 core data types (their names are numpy's)
SUPPORTED_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        n = -1
    return min(1024, n) if n > 0 else 1024


_IOV_MAX = _iov_max()
_WRITE_BATCH_BYTES = 8 << 20
#: raw bytes of inner chunks encoded per task of the encode pool (about 16 chunks of 128 KB)
_TASK_BYTES = 2 << 20


def crc32c(data) -> int:
    """CRC-32C (Castagnoli) of a bytes-like object, as the Zarr v3 ``crc32c`` codec computes it."""
    return crc32c_update(bytes(memoryview(data).cast("B")))


def _named(codec) -> tuple[str, dict]:
    if isinstance(codec, str):
        return codec, {}
    if not isinstance(codec, dict) or "name" not in codec:
        raise UnsupportedShardFormat(f"Unreadable codec entry {codec!r} in the array metadata.")
    return codec["name"], codec.get("configuration") or {}


def bytes_codec(codec, dtype: np.dtype, where: str) -> tuple[str, object]:
    """(name, numcodecs implementation; None for crc32c, which shardio applies itself) of one inner
    bytes-to-bytes codec entry of a Zarr v3 array's metadata (a JSON dict or a bare name)."""
    name, ccfg = _named(codec)
    if name == "zstd":
        from numcodecs import Zstd

        return name, Zstd(level=int(ccfg.get("level", 0)), checksum=bool(ccfg.get("checksum", False)))
    if name == "blosc":
        return name, _blosc(ccfg, dtype, where)
    if name == "crc32c":
        return name, None
    raise UnsupportedShardFormat(f"{where}: inner codec {name!r} is not supported; this writer applies "
                                 f"'bytes' then any of {list(SUPPORTED_BYTES_CODECS)}.")


def _endian(config: dict, dtype: np.dtype, where: str) -> str:
    endian = config.get("endian", "little" if dtype.itemsize == 1 else None)
    if endian not in ("little", "big"):
        raise UnsupportedShardFormat(f"The {where} 'bytes' codec has endian {endian!r}; expected 'little' or 'big'.")
    return "<" if endian == "little" else ">"


def _parse_fill(value, dtype: np.dtype):
    """A Zarr v3 ``fill_value`` (JSON) as a numpy scalar of ``dtype``."""
    if dtype.kind == "b":
        if not isinstance(value, bool):
            raise UnsupportedShardFormat(f"A bool array needs a bool fill_value. Got {value!r} instead.")
        return np.bool_(value)
    if dtype.kind in "iu":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedShardFormat(f"An integer array needs an integer fill_value. Got {value!r} instead.")
        return dtype.type(value)
    # float: a number, "NaN", "Infinity", "-Infinity", or "0x..." (the value's bits, big-endian hex)
    if isinstance(value, str):
        special = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
        if value in special:
            return dtype.type(special[value])
        if value.startswith("0x"):
            bits = np.array([int(value, 16)], dtype=f"u{dtype.itemsize}")
            return bits.view(dtype)[0]
        raise UnsupportedShardFormat(f"Unreadable float fill_value {value!r}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedShardFormat(f"A float array needs a numeric fill_value. Got {value!r} instead.")
    return dtype.type(value)


def key_encoding(meta: dict, where: str) -> tuple[str | None, str]:
    """(key prefix, separator) of a Zarr v3 array's ``chunk_key_encoding``: ``default`` ("c", "/" unless set) or
    ``v2`` (no prefix, "." unless set)."""
    name, cfg = _named(meta.get("chunk_key_encoding") or {"name": "default"})
    if name == "default":
        prefix, sep = "c", cfg.get("separator", "/")
    elif name == "v2":
        prefix, sep = None, cfg.get("separator", ".")
    else:
        raise UnsupportedShardFormat(f"{where}: chunk key encoding {name!r} is not supported.")
    if sep not in ("/", "."):
        raise UnsupportedShardFormat(f"{where}: chunk key separator {sep!r} is not supported.")
    return prefix, sep


def chunk_key(coords, prefix: str | None, sep: str) -> str:
    """The key (relative to the array) of the chunk (or shard) at grid ``coords``."""
    parts = [str(int(c)) for c in coords]
    if prefix is None:
        return sep.join(parts) if parts else "0"
    return sep.join([prefix, *parts])


def local_dir(array, what: str) -> Path:
    """The directory of a zarr-python ``Array`` in a local filesystem store; UnsupportedShardFormat for any other
    store (``what``: 'writes' or 'reads', for the message)."""
    from zarr.storage import LocalStore

    store = getattr(array, "store", None)
    if not isinstance(store, LocalStore):
        raise UnsupportedShardFormat(
            f"Array {array.path!r} lives in a {type(store).__name__}; direct shard {what} need a local "
            "filesystem store (zarr.storage.LocalStore)."
        )
    return Path(store.root) / array.path


class ShardArray:
    """One sharded Zarr v3 array of a local store, written a whole shard at a time."""

    def __init__(self, array_dir, meta: dict):
        self.dir = Path(array_dir)
        self.meta = meta
        where = f"array {self.dir}"
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise UnsupportedShardFormat(f"{where}: not a Zarr v3 array.")
        if meta.get("storage_transformers"):
            raise UnsupportedShardFormat(f"{where}: storage transformers are not supported.")
        dtype_name = meta.get("data_type")
        if not isinstance(dtype_name, str) or dtype_name not in SUPPORTED_DTYPES:
            raise UnsupportedShardFormat(f"{where}: data type {dtype_name!r} is not supported; expected one of "
                                         f"{list(SUPPORTED_DTYPES)}.")
        self.shape = tuple(int(x) for x in meta["shape"])
        grid_name, grid_cfg = _named(meta.get("chunk_grid"))
        if grid_name != "regular":
            raise UnsupportedShardFormat(f"{where}: chunk grid {grid_name!r} is not supported (only 'regular').")
        self.shard_shape = tuple(int(x) for x in grid_cfg["chunk_shape"])
        codecs = meta.get("codecs") or []
        if len(codecs) != 1 or _named(codecs[0])[0] != "sharding_indexed":
            names = [_named(c)[0] for c in codecs]
            raise UnsupportedShardFormat(f"{where}: codecs {names} are not a lone 'sharding_indexed' codec.")
        cfg = _named(codecs[0])[1]
        self.chunk_shape = tuple(int(x) for x in cfg["chunk_shape"])
        if len(self.shard_shape) != len(self.shape) or len(self.chunk_shape) != len(self.shape):
            raise UnsupportedShardFormat(f"{where}: shard/chunk shapes do not match the array's rank.")
        if any(c <= 0 or s % c for s, c in zip(self.shard_shape, self.chunk_shape)):
            raise UnsupportedShardFormat(f"{where}: inner chunk shape {self.chunk_shape} does not divide the "
                                         f"shard shape {self.shard_shape}.")
        self.chunks_per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))
        base = np.dtype(dtype_name)
        self.fill_value = _parse_fill(meta.get("fill_value"), base)

        inner = list(cfg.get("codecs") or [])
        first = _named(inner[0])[0] if inner else None
        if first != "bytes":
            raise UnsupportedShardFormat(f"{where}: inner codecs must start with 'bytes'. Got {first!r} instead.")
        self.dtype = base.newbyteorder(_endian(_named(inner[0])[1], base, "inner"))
        self.bytes_codecs = [bytes_codec(c, base, where) for c in inner[1:]]  # (name, numcodecs codec or None)

        index = [_named(c) for c in (cfg.get("index_codecs") or [])]
        if not index or index[0][0] != "bytes" or [n for n, _ in index[1:]] not in ([], ["crc32c"]):
            raise UnsupportedShardFormat(f"{where}: index codecs {[n for n, _ in index]} are not supported; "
                                         "expected ['bytes'] or ['bytes', 'crc32c'].")
        self.index_dtype = np.dtype("uint64").newbyteorder(_endian(index[0][1], np.dtype("uint64"), "index"))
        self.index_crc = len(index) == 2
        self.index_location = cfg.get("index_location", "end")
        if self.index_location not in ("start", "end"):
            raise UnsupportedShardFormat(f"{where}: index_location {self.index_location!r} is not supported.")
        self.index_nbytes = 16 * int(np.prod(self.chunks_per_shard)) + 4 * self.index_crc
        self.chunk_nbytes = self.dtype.itemsize * int(np.prod(self.chunk_shape))
        self._present_cache: dict = {}
        self.direct_io = True  # O_DIRECT shard files where the platform and filesystem allow (see stage)

        self._key_prefix, self._sep = key_encoding(meta, where)

    # ------------------------------------------------------------------ opening

    @classmethod
    def from_path(cls, array_dir) -> ShardArray:
        """Read ``<array_dir>/zarr.json``."""
        path = Path(array_dir) / "zarr.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UnsupportedShardFormat(f"Cannot read the array metadata {path}: {err}") from None
        return cls(array_dir, meta)

    @classmethod
    def open(cls, array) -> ShardArray:
        """The direct writer of a zarr-python ``Array``; refused unless its store is a writable local directory."""
        array_dir = local_dir(array, "writes")
        if array.store.read_only:
            raise UnsupportedShardFormat(f"Array {array.path!r}: the store is read-only.")
        if not (hasattr(os, "writev") and hasattr(os, "pwrite")):
            raise UnsupportedShardFormat("Direct shard writes need os.writev and os.pwrite (POSIX).")
        return cls.from_path(array_dir)

    # ------------------------------------------------------------------ keys

    def shard_key(self, coords) -> str:
        """The shard's key (relative to the array) under the array's chunk key encoding."""
        return chunk_key(coords, self._key_prefix, self._sep)

    def shard_path(self, coords) -> Path:
        return self.dir.joinpath(*self.shard_key(coords).split("/"))

    @property
    def compressed(self) -> bool:
        return bool(self.bytes_codecs)

    # ------------------------------------------------------------------ encoding

    def _check(self, coords, block) -> tuple[int, ...]:
        coords = tuple(int(c) for c in coords)
        if len(coords) != len(self.shape) or block.ndim != len(self.shape):
            raise StoreError(f"{self.dir.name}: a shard write needs {len(self.shape)}-d shard coordinates and block. "
                             f"Got coordinates {coords} and a block of shape {block.shape} instead.")
        for d, (c, n, s, size) in enumerate(zip(coords, block.shape, self.shard_shape, self.shape)):
            if c < 0 or c * s >= size:
                raise StoreError(f"{self.dir.name}: shard coordinate {c} on axis {d} is outside the array "
                                 f"(shape {self.shape}, shard shape {self.shard_shape}).")
            if n > s or c * s + n > size:
                raise StoreError(f"{self.dir.name}: a block of shape {block.shape} at shard {coords} does not fit "
                                 f"in one shard (shard shape {self.shard_shape}, array shape {self.shape}).")
        return coords

    def _present(self, extent) -> list[tuple[int, tuple[slice, ...], bool]]:
        """(flat index in C order, slices into the block, padded?) of every inner chunk the block touches."""
        extent = tuple(extent)
        cached = self._present_cache.get(extent)
        if cached is not None:
            return cached
        out = []
        for flat, idx in enumerate(np.ndindex(*self.chunks_per_shard)):
            lo = [i * c for i, c in zip(idx, self.chunk_shape)]
            if any(l >= n for l, n in zip(lo, extent)):
                continue
            hi = [min(l + c, n) for l, c, n in zip(lo, self.chunk_shape, extent)]
            partial = any(h - l < c for l, h, c in zip(lo, hi, self.chunk_shape))
            out.append((flat, tuple(slice(l, h) for l, h in zip(lo, hi)), partial))
        if len(self._present_cache) > 64:
            self._present_cache.clear()
        self._present_cache[extent] = out
        return out

    def _chunk_array(self, block, sl, partial, out=None) -> np.ndarray:
        """The inner chunk in storage dtype and byte order, C-contiguous, padded with fill value."""
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype)
        part = block[sl]
        if partial:
            out.fill(self.fill_value)
            out[tuple(slice(0, s.stop - s.start) for s in sl)] = part
        else:
            np.copyto(out, part, casting="unsafe")
        return out

    def _encode_chunk(self, block, sl, partial):
        buf = self._chunk_array(block, sl, partial)
        for name, impl in self.bytes_codecs:
            if impl is not None:  # zstd, blosc
                buf = impl.encode(buf)
            else:  # crc32c
                raw = memoryview(buf).cast("B")
                buf = bytes(raw) + np.array([crc32c(raw)], dtype="<u4").tobytes()
        return buf

    def _encoded(self, block, present, executor: Executor | None, gather: bool = False
                 ) -> Iterator[tuple[list[int], list]]:
        """The encoded inner chunks of ``present``, in order, in groups of about 8 MB.

        Each group is (encoded size of each of its chunks, buffers holding their bytes back to back).
        A group's buffers may be reused once the next group is asked for: write each group first.
        Uncompressed, a group is views of the block's contiguous runs unless ``gather`` (or the block is not
        in storage dtype and C order): then one buffer the chunks are copied into.
        """
        if self.compressed:
            if executor is None:
                encoded = (self._encode_chunk(block, sl, partial) for _flat, sl, partial in present)
            else:  # a few chunks a task: one future and thread wake-up per chunk cost ~40 us (0.2 CPU-s per 4,600)
                per = max(1, _TASK_BYTES // self.chunk_nbytes)
                tasks = [present[i : i + per] for i in range(0, len(present), per)]
                encoded = itertools.chain.from_iterable(executor.map(
                    lambda task: [self._encode_chunk(block, sl, partial) for _flat, sl, partial in task], tasks))
            sizes, bufs, total = [], [], 0
            for enc in encoded:
                view = memoryview(enc).cast("B")
                sizes.append(view.nbytes)
                bufs.append(view)
                total += view.nbytes
                if total >= _WRITE_BATCH_BYTES or len(bufs) >= _IOV_MAX:
                    yield sizes, bufs
                    sizes, bufs, total = [], [], 0
            if bufs:
                yield sizes, bufs
            return
        per = max(1, _WRITE_BATCH_BYTES // self.chunk_nbytes)
        if block.dtype == self.dtype and block.flags.c_contiguous and not gather:
            yield from self._runs(block, present)
            return
        # another dtype or byte order, or a strided block: gather into one reused buffer
        buf = np.empty((min(per, len(present)),) + self.chunk_shape, dtype=self.dtype)
        for i in range(0, len(present), per):
            batch = present[i : i + per]
            for j, (_flat, sl, partial) in enumerate(batch):
                self._chunk_array(block, sl, partial, out=buf[j])
            yield [self.chunk_nbytes] * len(batch), [memoryview(buf[: len(batch)].reshape(-1).view(np.uint8))]

    def _runs(self, block: np.ndarray, present) -> Iterator[tuple[list[int], list]]:
        """No compressor, block in storage dtype and C order: each chunk's bytes are views of the block's
        contiguous runs (the kernel copies them; no copy here). Padded chunks are built whole."""
        strides = block.strides
        k, run = block.ndim, block.itemsize  # trailing axes a chunk covers whole: one contiguous run
        while k and (self.chunk_shape[k - 1] == 1 or strides[k - 1] == run):
            run *= self.chunk_shape[k - 1]
            k -= 1
        inner = np.zeros((1,), dtype=np.int64)  # run offsets within a chunk, C order
        for axis in range(k):
            steps = np.arange(self.chunk_shape[axis], dtype=np.int64) * strides[axis]
            inner = (inner[:, None] + steps[None, :]).reshape(-1)
        raw = memoryview(block.reshape(-1).view(np.uint8))
        per = max(1, min(_WRITE_BATCH_BYTES // self.chunk_nbytes, _IOV_MAX // len(inner)))
        for i in range(0, len(present), per):
            batch = present[i : i + per]
            bufs = []
            starts = [sum(s.start * st for s, st in zip(sl, strides)) for _flat, sl, partial in batch if not partial]
            offsets = (np.array(starts, dtype=np.int64)[:, None] + inner[None, :]).reshape(-1).tolist()
            views = [raw[o : o + run] for o in offsets]
            per_chunk = len(inner)
            j = 0
            for _flat, sl, partial in batch:
                if partial:
                    bufs.append(memoryview(self._chunk_array(block, sl, True).reshape(-1).view(np.uint8)))
                else:
                    bufs.extend(views[j : j + per_chunk])
                    j += per_chunk
            yield [self.chunk_nbytes] * len(batch), bufs

    def index_bytes(self, offsets_and_lengths: np.ndarray) -> bytes:
        """Encode a shard index ((*chunks_per_shard, 2) uint64) with the index codecs."""
        raw = np.ascontiguousarray(offsets_and_lengths, dtype=self.index_dtype).tobytes()
        if self.index_crc:
            raw += np.array([crc32c(raw)], dtype="<u4").tobytes()
        return raw

    # ------------------------------------------------------------------ writing

    def stage(self, coords, block: np.ndarray, executor: Executor | None = None) -> StagedShard:
        """Encode and write the shard to a temporary file; :meth:`StagedShard.commit` makes it the shard.

        ``block`` is placed at the origin of the shard at shard-grid ``coords`` and replaces the whole
        shard. Inner chunks are encoded on ``executor`` when given (numcodecs' zstd and blosc release the GIL).
        With ``direct_io`` (and the index at the end) the file is written with ``O_DIRECT``, past the page
        cache; a filesystem that refuses it turns ``direct_io`` off and the shard is written buffered.
        """
        coords = self._check(coords, block)
        present = self._present(block.shape)
        path = self.shard_path(coords)
        if not present:
            return StagedShard(path, None, None, 0, [])
        created = _makedirs(path.parent)
        if self.direct_io and self.index_location == "end" and _O_DIRECT:
            try:
                return self._stage(path, block, present, executor, created, direct=True)
            except DirectIORefused:
                self.direct_io = False  # this filesystem (tmpfs, some network filesystems): buffered from now on
        return self._stage(path, block, present, executor, created, direct=False)

    def _stage(self, path: Path, block, present, executor, created, direct: bool) -> StagedShard:
        tmp = path.parent / tmp_name(path.name)  # carries its owner: a resume removes it if that owner died
        oal = np.full((int(np.prod(self.chunks_per_shard)), 2), MISSING, dtype=np.uint64)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | (_O_DIRECT if direct else 0)
        try:
            fd = os.open(tmp, flags, 0o666)
        except OSError as err:
            if direct and err.errno == errno.EINVAL:
                raise DirectIORefused from err
            raise
        made: list = []  # the sink, once made
        try:
            start = self.index_nbytes if self.index_location == "start" else 0
            if start:
                os.lseek(fd, start, os.SEEK_SET)
            sink = _DirectSink(fd) if direct else _BufferedSink(fd, start)
            made.append(sink)
            pos, k = start, 0
            for sizes, bufs in self._encoded(block, present, executor, gather=direct):
                first = pos
                for size in sizes:
                    oal[present[k][0]] = (pos, size)
                    pos += size
                    k += 1
                sink.write(bufs, pos - first)
            index = self.index_bytes(oal.reshape(self.chunks_per_shard + (2,)))
            if self.index_location == "start":
                _pwrite(fd, index, 0)
                crc = None  # the file does not start with the chunks: checksummed from the file
            else:
                sink.write([memoryview(index)], len(index))
                pos += len(index)
                crc = sink.close()
        except BaseException as err:
            for sink in made:
                if isinstance(sink, _DirectSink):
                    sink.release()
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if direct and isinstance(err, OSError) and err.errno == errno.EINVAL:
                raise DirectIORefused from err
            raise
        return StagedShard(path, tmp, fd, pos, created, None if crc is None else (crc, pos))

    def write(self, coords, block: np.ndarray, executor: Executor | None = None) -> int:
        """:meth:`stage` then commit: the shard is in place and durable on return. Returns its size in bytes."""
        return self.stage(coords, block, executor).commit()


class StagedShard:
    """A shard written to its temporary file, not yet in place (``tmp`` None: the shard is to be removed).

    ``crc``: (CRC-32C, size) of the whole file as written, or None where it was not computed while writing."""

    def __init__(self, path: Path, tmp: Path | None, fd: int | None, nbytes: int, created: list[Path],
                 crc: tuple[int, int] | None = None):
        self.path, self.tmp, self.fd, self.nbytes, self.created = path, tmp, fd, nbytes, created
        self.crc = crc

    def commit(self) -> int:
        """fsync the temporary file, rename it over the shard key, fsync the directory. Returns the size."""
        if self.tmp is None:
            if self.path.exists():
                self.path.unlink()
                _fsync_dir(self.path.parent)
            return 0
        try:
            os.fsync(self.fd)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = None
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        for d in self.created:  # new directories: make their entries durable too
            _fsync_dir(d.parent)
        return self.nbytes

    def abort(self) -> None:
        """Drop the temporary file; the shard keeps its previous content."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


_O_DIRECT = getattr(os, "O_DIRECT", 0)
_ALIGN = 4096  # O_DIRECT offsets, sizes and buffer addresses: a multiple of every usual logical block size


class _BufferedSink:
    """Shard bytes through the page cache: written as they come, writeback started at once, CRC-32C taken."""

    def __init__(self, fd: int, start: int = 0):
        self.fd, self.pos, self.crc = fd, start, 0

    def write(self, bufs: list, nbytes: int) -> None:
        for b in bufs:  # before the write: _writev may edit the list
            self.crc = crc32c_update(b, self.crc)
        _writev(self.fd, bufs, nbytes)
        start_writeback(self.fd, self.pos, nbytes)
        self.pos += nbytes

    def close(self) -> int:
        return self.crc


class _DirectSink:
    """Shard bytes past the page cache (O_DIRECT): gathered into one page-aligned buffer, written in whole
    aligned blocks; the last block is zero-padded and the file truncated back to its size. No page-cache
    copy, no writeback to wait for: the device reads the buffer. CRC-32C taken over the data bytes."""

    def __init__(self, fd: int, size: int = _WRITE_BATCH_BYTES):
        import mmap

        self.fd, self.pos, self.crc, self.fill = fd, 0, 0, 0
        self._map = mmap.mmap(-1, size)  # anonymous: page-aligned
        self.view = memoryview(self._map)

    def write(self, bufs: list, nbytes: int) -> None:
        view, size = self.view, len(self.view)
        for b in bufs:
            mv = memoryview(b)
            if mv.format != "B":
                mv = mv.cast("B")
            while mv.nbytes:
                n = min(mv.nbytes, size - self.fill)
                view[self.fill : self.fill + n] = mv[:n]
                self.fill += n
                mv = mv[n:]
                if self.fill == size:
                    self._flush()
        self.pos += nbytes

    def _flush(self) -> None:
        self.crc = crc32c_update(self.view[: self.fill], self.crc)
        padded = -(-self.fill // _ALIGN) * _ALIGN
        self.view[self.fill : padded] = bytes(padded - self.fill)
        data = self.view[:padded]
        while data.nbytes:
            data = data[os.write(self.fd, data):]
        self.fill = 0

    def close(self) -> int:
        try:
            if self.fill:
                self._flush()
                os.ftruncate(self.fd, self.pos)  # drop the padding of the last block
        finally:
            self.release()
        return self.crc

    def release(self) -> None:
        if not self._map.closed:
            self.view.release()
            self._map.close()


def _writev(fd: int, bufs: list, total: int | None = None) -> None:
    """Write every buffer, in order; os.writev may write less than asked (``bufs`` is then edited).

    ``total``, their size when the caller knows it, spares summing them in the usual one-call case.
    """
    i = 0
    while i < len(bufs):
        batch = bufs[i : i + _IOV_MAX]
        n = os.writev(fd, batch)
        if i == 0 and n == total and len(batch) == len(bufs):
            return
        while i < len(bufs) and n >= bufs[i].nbytes:
            n -= bufs[i].nbytes
            i += 1
        if n:
            bufs[i] = bufs[i][n:]


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` from ``offset`` of ``fd`` to disk now, without waiting
    (Linux; elsewhere a no-op). Durability still comes from the fsync of :meth:`StagedShard.commit`: this
    only keeps the disk busy while the rest of the shard is encoded, instead of idle until the fsync."""
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


def _blosc(config: dict, dtype: np.dtype, where: str):
    """numcodecs' Blosc for a Zarr v3 ``blosc`` codec configuration (as zarr-python builds it)."""
    from numcodecs import Blosc

    shuffle = config.get("shuffle", "noshuffle")
    if shuffle not in BLOSC_SHUFFLE:
        raise UnsupportedShardFormat(f"{where}: blosc shuffle {shuffle!r} is not one of {list(BLOSC_SHUFFLE)}.")
    return Blosc(cname=str(config.get("cname", "zstd")), clevel=int(config.get("clevel", 5)),
                 shuffle=BLOSC_SHUFFLE[shuffle], blocksize=int(config.get("blocksize", 0)),
                 typesize=int(config.get("typesize", dtype.itemsize)))


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _makedirs(path: Path) -> list[Path]:
    """mkdir -p; returns the directories it created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:  # another writer made it
            pass
    return created


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)
