"""Open a store: plain xarray underneath, decoded and checked on top. No torch.

Usage::

    from gapcache.store import open_store, info
    ds = open_store("run/store.zarr")            # lazy (dask) xarray.Dataset, states as float32
    ds.text_states.sel(condition="original", site="prediction", layer=12)
    visual_span(ds, "synthetic-000003")           # (vtoken, layer, hidden) of one sample
    info("run/store.zarr")                        # counts, sizes, provenance (also `gapcache info`)

Without gapcache: ``xarray.open_zarr(path)`` gives the same arrays, with bf16 states as their raw
uint16 bits (decode with ``(raw.astype('uint32') << 16).view('float32')``).
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import numpy as np

from gapcache.conditions import DEEPSTACK_ATTR
from gapcache.errors import DamagedChunkError, SchemaVersionError, StoreError, UnsupportedShardFormat
from gapcache.store import arrays, codec
from gapcache.store.schema import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    SUPPORTED_SCHEMA_VERSIONS,
)

#: what zarr's codecs raise on damaged bytes (crc32c mismatch, broken zstd frame, bad vlen lengths)
DECODE_ERRORS = (ValueError, RuntimeError, IndexError, OverflowError, TypeError, EOFError)


def root_attrs(path, storage_options: dict | None = None) -> dict:
    """The store's root attributes, after checking it is a gapcache store of a known schema.

    ``path`` may be a URL (``http://``, ``s3://``, ...: opened read-only through fsspec).
    """
    import zarr

    from gapcache.store.remote import is_url, zarr_store

    try:
        group = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
        local = None if is_url(path) else Path(path)
        if local is not None and local.is_dir() and not (local / "zarr.json").is_file():
            raise StoreError(f"No gapcache store at {path}: the directory exists but its root metadata file "
                             f"'{local / 'zarr.json'}' is missing. Expected a directory written by `gapcache extract` "
                             "(pass the store itself, RUN/store.zarr, not a folder inside or around it).") from None
        raise StoreError(f"No gapcache store at {path}: {err}. Expected a directory written by `gapcache extract`.") from None
    attrs = group.attrs.asdict()
    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(f"{path} is a Zarr group but not a gapcache store: it has no 'schema_version' attribute.")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise SchemaVersionError(
            f"The store at {path} has schema_version {version!r}; this gapcache "
            f"(supports {list(SUPPORTED_SCHEMA_VERSIONS)}) cannot read it. "
            "Install the gapcache version that wrote it (see the store's 'gapcache_version' attribute)."
        )
    return attrs


def open_store(path, decode: bool = True, storage_options: dict | None = None):
    """Lazy xarray view of a store; hidden states decoded to float32 when ``decode``.

    ``path`` may be a URL: ``http(s)://.../store.zarr`` or ``s3://bucket/store.zarr`` (credentials and
    ``endpoint_url`` in ``storage_options``); remote stores are opened read-only, without copying,
    from their consolidated metadata when they have it (HTTP cannot list directories).

    Reading a damaged chunk (through this view) raises :class:`DamagedChunkError` naming the array and
    the chunk, not a bare codec error.
    """
    import xarray as xr
    import zarr

    from gapcache.store.remote import is_url, zarr_store

    attrs = root_attrs(path, storage_options)
    store = zarr_store(path, storage_options) if is_url(path) else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # "failed to open consolidated"
            if is_url(path):
                try:
                    ds = xr.open_zarr(store, consolidated=True, chunks={}, zarr_format=3)
                except (KeyError, FileNotFoundError, ValueError):  # no consolidated metadata: list the store
                    ds = xr.open_zarr(store, consolidated=False, chunks={}, zarr_format=3)
            else:
                ds = xr.open_zarr(store, consolidated=False, chunks={}, zarr_format=3)
    except DECODE_ERRORS as err:  # an index coordinate (read at open) is damaged
        group = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
        raise damage_error(path, group, err) from None
    group = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
    ds = _guard(ds, group, path, decode)
    ds.attrs = attrs
    if decode:
        for spec in arrays.specs(state=True):
            if spec.name not in ds or ds[spec.name].attrs.get(codec.ENCODING_ATTR) == "decoded":
                continue
            var = ds[spec.name]  # not guarded (not a plain view of its zarr array): decode lazily on top
            enc = var.attrs.get(codec.ENCODING_ATTR, "none")
            ds[spec.name] = var.copy(data=codec.decode(var.data, enc))
            ds[spec.name].attrs = {**var.attrs, codec.ENCODING_ATTR: "decoded"}
    return ds


#: decoded (float32) bytes one dask block of a hidden-state array may hold before it is split below its shard
STATE_BLOCK_BYTES = 128 * 2**20


def state_chunks(arr, max_bytes: int = STATE_BLOCK_BYTES) -> tuple[int, ...]:
    """Dask block shape of a hidden-state zarr array ``arr``, from its chunking: one inner chunk along every
    axis (one condition, one site, one layer, all of hidden) but the rows (axis 1: samples or span tokens),
    along which a block spans the whole shard (a shard group of samples: one read of one layer of one shard
    file), or, where that block would exceed ``max_bytes`` decoded, the largest whole number of inner chunks
    that divides the shard and stays under it. The block count grows with the shards, not with the inner
    chunks (a 64-token inner chunk per block made an 8 GB store a graph of ~100k tasks)."""
    inner, outer = tuple(arr.chunks), tuple(arr.shards or arr.chunks)
    per_row = 4 * int(np.prod([c for i, c in enumerate(inner) if i != 1], dtype=np.int64))
    n_inner = max(1, outer[1] // inner[1])
    k = max([d for d in range(1, n_inner + 1) if n_inner % d == 0 and d * inner[1] * per_row <= max_bytes] or [1])
    return (inner[0], min(k * inner[1], arr.shape[1]) or 1, *inner[2:])


#: dask array name -> the _Guarded array open_store built it over (for :func:`read_whole`)
_GUARDED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def read_whole(data) -> np.ndarray | None:
    """All of ``data`` in one read when it is a whole, unsliced variable of :func:`open_store` (not the hidden
    states): no dask task per chunk (~0.25 ms each; a 10,000-sample store's small arrays are ~7,200 chunks).
    None for any other array, or when a chunk is damaged (the per-chunk read then names it)."""
    guarded = _GUARDED.get(getattr(data, "name", None))
    if guarded is None or guarded.arr.shards is not None or tuple(data.shape) != tuple(guarded.shape):
        return None  # not a store variable, a sharded (hidden-state) one, or a slice of one
    try:
        return guarded[...]
    except DamagedChunkError:
        return None


class _Guarded:
    """A zarr array for ``dask.array.from_array`` whose decode errors name the array and its chunk keys;
    with ``encoding`` (a hidden-state array's ``gapcache_encoding``) what it reads comes back decoded, so
    that dask fuses a slice of a block into the read (only the inner chunks asked for are read)."""

    def __init__(self, arr, path, encoding: str | None = None):
        self.arr, self.path, self.encoding = arr, path, encoding
        self.shape, self.ndim = arr.shape, arr.ndim
        self.dtype = np.dtype(np.float32) if encoding == "bfloat16" else arr.dtype
        self.direct = _direct_reader(arr)

    def __getitem__(self, key):
        try:
            raw = self._read(key)
        except DECODE_ERRORS as err:
            raise DamagedChunkError(_damage_message(self.path, self.arr, _chunk_keys(self.arr, key), err)) from None
        return raw if self.encoding is None else codec.decode(raw, self.encoding)

    def _read(self, key):
        """``arr[key]``: straight from the shard or chunk files where the array allows it
        (gapcache.store.shardread), else through zarr-python."""
        if self.direct is not None:
            try:
                return self.direct[key]
            except UnsupportedShardFormat:  # a selection it does not take (steps, fancy indexing)
                pass
        return self.arr[key]


def _direct_reader(arr):
    """The direct reader of a local zarr array (sharded: ShardReader; chunked: ChunkReader), or None (another
    store or layout: zarr reads it)."""
    from gapcache.store.shardread import ChunkReader, ShardReader

    try:
        return ShardReader.open(arr) if arr.shards is not None else ChunkReader.open(arr)
    except UnsupportedShardFormat:
        return None


def _guard(ds, group, path, decode: bool = False):
    """Every lazily read (dask) variable of ``ds`` re-built over a guarded zarr array, same chunks and dtype;
    hidden-state arrays in :func:`state_chunks` blocks, decoded as read when ``decode``."""
    import uuid

    import dask.array as da

    states = {s.name for s in arrays.specs(state=True)}
    new_vars, new_coords = {}, {}  # assigned at once: one merge, not one per variable (41 on the demo: 0.27 s)
    for name in [*ds.data_vars, *[c for c in ds.coords if c not in ds.dims]]:
        var = ds[name].variable
        if not hasattr(var.data, "dask") or name not in group:
            continue
        arr = group[name]
        if arr.dtype != var.dtype or tuple(arr.shape) != var.shape:
            continue  # not a plain view of the zarr array: leave xarray's reader
        chunks, meta, attrs = var.data.chunks, var.data._meta, var.attrs
        enc = None
        if name in states:
            chunks = state_chunks(arr)
            if decode:
                enc = var.attrs.get(codec.ENCODING_ATTR, "none")
                meta, attrs = np.empty((0,) * arr.ndim, _Guarded(arr, path, enc).dtype), {**attrs, codec.ENCODING_ATTR: "decoded"}
        guarded = _Guarded(arr, path, enc)
        data = da.from_array(guarded, chunks=chunks, asarray=False, meta=meta, name=f"gapcache-{name}-{uuid.uuid4().hex}")
        _GUARDED[data.name] = guarded
        new = var.copy(data=data)
        new.attrs = attrs
        (new_vars if name in ds.data_vars else new_coords)[name] = new
    return ds.assign_coords(new_coords).assign(new_vars)


def _chunk_keys(arr, key) -> list[str]:
    """Storage keys (shards for sharded arrays) that a basic selection touches."""
    import itertools

    grid = arr.shards or arr.chunks
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):  # (not `in`: a key may hold arrays)
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (arr.ndim - len(key) + 1) + key[at + 1 :]
    key = key + (slice(None),) * (arr.ndim - len(key))
    ranges = []
    for k, size, n in zip(key, grid, arr.shape):
        if isinstance(k, slice):
            start, stop, _ = k.indices(n)
            ranges.append(range(start // size, max(start // size + 1, -(-stop // size))))
        else:
            ranges.append(range(int(k) // size, int(k) // size + 1))
    return [arr.metadata.encode_chunk_key(c) for c in itertools.product(*ranges)]


def _damage_message(path, arr, keys, err) -> str:
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return (f"Array {arr.path!r} of the store at {path} is damaged in chunk {shown}: {type(err).__name__}: {err}. "
            f"Run `gapcache verify {path}` to list every damaged chunk; restore the store from its source "
            "or re-extract the affected conditions.")


def damage_error(path, group, err) -> DamagedChunkError:
    """The first damaged chunk among the small (non-state) arrays, as a DamagedChunkError."""
    for spec in arrays.specs(state=False):
        if spec.name in group:
            bad = damaged_chunks(group[spec.name])
            if bad:
                return DamagedChunkError(_damage_message(path, group[spec.name], [k for k, _ in bad], bad[0][1]))
    return DamagedChunkError(f"The store at {path} cannot be read: {type(err).__name__}: {err}. "
                             f"Run `gapcache verify {path}`.")


def damaged_chunks(arr) -> list[tuple[str, BaseException]]:
    """(key, error) of every chunk of ``arr`` that does not decode; one read when none is damaged."""
    import itertools

    try:
        arr[...]
        return []
    except DECODE_ERRORS:
        pass
    grid = arr.chunks
    bad = []
    for c in itertools.product(*[range(-(-n // s)) for n, s in zip(arr.shape, grid)]):
        sl = tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(c, grid, arr.shape))
        try:
            arr[sl]
        except DECODE_ERRORS as err:
            bad.append((arr.metadata.encode_chunk_key(c), err))
    return bad


def visual_span(ds, sample):
    """(vtoken, layer, hidden) states of one sample (index or id), for every visual condition."""
    return span_rows(ds, sample, "visual")


def span_rows(ds, sample, span: str = "visual"):
    """(token, layer, hidden) states of one sample (index or id) in a ragged span, for every condition recording it."""
    sp = arrays.SPANS[span]
    i = int(sample) if isinstance(sample, (int, np.integer)) else list(ds.sample.values).index(sample)
    off, length = int(ds[sp.offset][i]), int(ds[sp.length][i])
    return ds[sp.states].isel({sp.token_dim: slice(off, off + length)})


def gold_answers(ds) -> list[list[str]]:
    """Every gold answer of each sample (a list of str per sample, in sample order).

    Decodes the ``answers`` array (a JSON-encoded list of str per sample); a store made before it was
    recorded falls back to ``[answer]`` (one gold per sample; '' gives []).
    """
    import json

    if "answers" in ds:
        return [json.loads(str(v)) if str(v) else [] for v in np.asarray(ds["answers"].values, dtype=object).ravel()]
    if "answer" in ds:
        return [[str(v)] if str(v) else [] for v in np.asarray(ds["answer"].values, dtype=object).ravel()]
    raise StoreError("The store records no gold answers (neither 'answers' nor 'answer').")


def size_on_disk(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _remote_size(path, storage_options) -> int | None:
    """Bytes of a remote store, where its filesystem can list it (S3 yes, plain HTTP no)."""
    from gapcache.store.remote import fs_and_root

    try:
        fs, root = fs_and_root(path, storage_options)
        return int(fs.du(root))
    except Exception:  # noqa: BLE001 - HTTP servers without listings
        return None


def info(path, storage_options: dict | None = None, size: bool = True) -> dict:
    """Summary of a store: the keys `gapcache info --json` prints (``path`` may be a URL).

    ``size=False`` skips ``size_bytes`` (None), which lists every shard file."""
    import zarr

    from gapcache.store.remote import is_url, zarr_store

    attrs = root_attrs(path, storage_options)
    g = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
    try:
        status = g["status"][...]
        labels = [str(x) for x in g["condition"][...]]
        layers = [int(x) for x in g["layer"][...]]
    except DECODE_ERRORS as err:
        raise damage_error(path, g, err) from None
    per_cond = {
        label: {
            "done": int((status[i] == STATUS_DONE).sum()),
            "failed": int((status[i] == STATUS_FAILED).sum()),
            "pending": int((status[i] == STATUS_PENDING).sum()),
        }
        for i, label in enumerate(labels)
    }
    return {
        "path": str(path) if is_url(path) else str(Path(path).resolve()),
        "schema_version": attrs["schema_version"],
        "gapcache_version": attrs.get("gapcache_version"),
        "model": attrs.get("model", {}),
        "deepstack_layers": attrs.get(DEEPSTACK_ATTR),  # None: a store made before gapcache recorded it
        "dataset": attrs.get("dataset", {}),
        "conditions": per_cond,
        "n_samples": int(status.shape[1]),
        "n_failed_samples": int((status == STATUS_FAILED).any(axis=0).sum()),
        "complete": bool((status != STATUS_PENDING).all()),
        "layers": layers,
        "sites": attrs.get("sites"),
        "hidden": int(g["text_states"].shape[-1]),
        "state_dtype": str(g["text_states"].dtype),
        "state_encoding": g["text_states"].attrs.get(codec.ENCODING_ATTR),
        "state_compression": codec.array_compression(g["text_states"]),
        "visual": attrs.get("visual", {}),
        "size_bytes": None if not size else _remote_size(path, storage_options) if is_url(path) else size_on_disk(path),
        "frozen": attrs.get("frozen"),
        "provenance": attrs.get("provenance", {}),
    }
