"""Create a store and write it shard by shard, off the compute thread.

Usage::

    create(path, layout, attrs, values)             # once: every declared array, values of the creation-time ones
    with StoreWriter(path) as w:                    # background threads do the writes
        for shard in w.pending(condition_index):    # resume: shards not yet done
            w.submit(ShardPayload(ci, shard, {...}))  # returns at once unless `max_pending` are queued

Which arrays exist, their chunking and codecs: :mod:`gapcache.store.arrays` (the one declaration).

A shard is written whole (zarr rewrites a whole shard on any partial write, so buffering a shard
avoids write amplification), states first and its ``status`` flags last: a process killed at any
point leaves the shard pending, and the rerun rewrites it. Nothing is done twice once flagged.

Hidden-state shards of a local store are encoded and written by :mod:`gapcache.store.shardio`
(the Zarr v3 sharding format, each shard file atomic and fsynced before its flags are written);
other stores, or codecs shardio does not implement, go through zarr-python.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
from pathlib import Path

import numpy as np

from gapcache.errors import IncompatibleStoreError, StoreError, StoreFrozenError
from gapcache.store import arrays, checksums, codec
from gapcache.store.arrays import ArraySpec
from gapcache.store.schema import (
    LAYER_CONVENTION,
    SCHEMA_VERSION,
    SITES,
    STATUS_PENDING,
    Layout,
)

log = logging.getLogger(__name__)

STR = str  # zarr v3 variable-length UTF-8 strings (vlen-utf8)
__all__ = ["ShardPayload", "StoreWriter", "StoreFrozenError", "create", "consolidate", "refuse_frozen"]


def _array_kwargs(spec: ArraySpec, shape, layout: Layout, attributes: dict | None = None) -> dict:
    """``create_array`` keywords of one declared array: chunking, codecs and fill value follow its spec
    (``along``, dtype); ``attributes`` go with its metadata (one write)."""
    chunks, shards = chunking(spec, shape, layout)
    dtype = spec.numpy_dtype(layout.model_dtype)
    kw = dict(shape=shape, dtype=STR if dtype == object else dtype, chunks=chunks, dimension_names=spec.dims,
              fill_value=spec.fill_value(layout.model_dtype))
    if spec.is_state:
        storage, encoding = codec.storage_for(layout.model_dtype)
        kw.update(shards=shards, compressors=codec.state_codecs(layout.state_compression, storage.itemsize))
        attributes = {**(attributes or {}), codec.ENCODING_ATTR: encoding, "model_dtype": layout.model_dtype}
    else:
        kw.update(checked_codecs(spec))
    return dict(attributes=attributes or None, **kw)


def checked_codecs(spec: ArraySpec) -> dict:
    """Codec settings of every array but the hidden states (schema 2): each chunk carries its own CRC-32C
    (portable core ``crc32c`` codec after zstd), and creation-time arrays store every chunk, so a deleted
    chunk is told from a fill-valued one."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()], "config": {"write_empty_chunks": spec.at_creation}}


def chunking(spec: ArraySpec, shape, layout: Layout):
    """(chunks, shards) of a declared array. Units and shard groups are whole chunks (or shards, for the
    hidden states, whose inner chunks hold one layer of one site / of ``visual_chunk_tokens`` tokens)."""
    full = tuple(max(1, int(n)) for n in shape)
    spc = layout.samples_per_shard
    vshard = layout.spans[spec.span].shard_tokens if spec.span in layout.spans else 0
    lead = {arrays.INDEX: (), arrays.STORE: (), arrays.SAMPLE: (spc,), arrays.SPAN: (vshard,),
            arrays.UNIT: (1, spc), arrays.VUNIT: (1, vshard)}[spec.along]
    outer = lead + full[len(lead):]
    if not spec.is_state:
        return outer, None
    head = (1, spc) if spec.along == arrays.UNIT else (1, layout.visual_chunk_tokens)
    inner = head + (1,) * (len(shape) - 3) + full[-1:]
    return inner, outer


def create(path, layout: Layout, attrs: dict, values: dict, overwrite: bool = False, array_attrs: dict | None = None):
    """Create the store at ``path``: every declared array, in one call, consolidated once.

    Arrays written at creation (``along`` index / store / sample / span) get their values now: those the
    layout fixes are derived from it; the others come from ``values`` (name -> numpy array, first axis =
    sample for per-sample arrays), e.g. question, answer, label, site_position (sample, site), the lens
    tables. An optional array without values, or whose dimensions the layout lacks, is not created. Unit arrays are allocated (nothing written).
    ``array_attrs`` maps array names to extra attributes (e.g. the lens norm's form).

    zarr builds every node in memory; the files are then written in one pass, the root ``zarr.json`` (attributes
    and consolidated metadata) last, so a creation killed midway leaves no root: not a store that looks whole.
    ``path`` must be a local directory; with ``overwrite`` whatever it holds is removed first.
    """
    import zarr
    from zarr.core.sync import sync  # what zarr's own synchronous API runs its coroutines with
    from zarr.storage import MemoryStore

    values = {**layout.derived_values(), **{k: np.asarray(v) for k, v in values.items()}}
    unknown = sorted((set(values) | set(array_attrs or {})) - set(arrays.ARRAYS))
    if unknown:
        raise StoreError(f"Arrays {unknown} are not declared in gapcache.store.arrays.ARRAYS; declare each with "
                         "register(ArraySpec(...)) before writing it.")
    sizes = layout.sizes()
    for spec in arrays.specs():
        if spec.at_creation and spec.name in values:
            _learn_sizes(spec, values[spec.name], sizes)
    if overwrite:
        refuse_frozen(path)
    elif _holds_files(path):
        raise StoreError(f"Cannot create a store at '{path}': it exists and is not empty. Pass overwrite=True to "
                         "replace it, or choose another path.")
    made = [spec for spec in arrays.specs() if _created(spec, layout, values, sizes)]
    links = _coordinate_links(made)
    root = _root_attrs(layout, attrs)
    kwargs = {spec.name: _array_kwargs(spec, tuple(sizes[d] for d in spec.dims), layout,
                                       {**(array_attrs or {}).get(spec.name, {}), **links.get(spec.name, {})})
              for spec in made}
    written = {s.name: values[s.name] for s in made if s.at_creation and np.prod(kwargs[s.name]["shape"])}
    files = {}  # key -> Buffer
    sync(_create_nodes(MemoryStore(files), root, kwargs, written))
    if overwrite:
        shutil.rmtree(path, ignore_errors=True)
    _write_files(path, files)
    return zarr.open_group(str(path), mode="r+")


def _holds_files(path) -> bool:
    try:
        return any(os.scandir(path))
    except NotADirectoryError:
        return True
    except FileNotFoundError:
        return False


def _write_files(path, files: dict) -> None:
    """Write a store built in memory (key -> zarr Buffer) under ``path``, the root ``zarr.json`` last. Plain
    writes, one per file: zarr's LocalStore adds a thread hop, a temporary file and a rename to each, and a file
    or folder creation costs 0.04-1.3 ms of system CPU on the disk measured (the bench store: 120 files in 86
    folders; creation 0.21-0.28 -> 0.115-0.146 CPU-s)."""
    root = Path(path)
    folders = set()
    for key in sorted(files, key=lambda k: k == "zarr.json"):
        target = root / key
        if target.parent not in folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            folders.add(target.parent)
        with open(target, "wb") as f:
            f.write(files[key].to_bytes())


async def _create_nodes(store, root: dict, kwargs: dict, written: dict) -> None:
    """The group (its attributes in one write) and every array, created and written concurrently in zarr's
    event loop, then consolidated: one round trip from this thread, not one per array and per value. Every
    array's task finishes before the first error is raised."""
    import asyncio
    import warnings

    import zarr.api.asynchronous as zarr_async

    group = await zarr_async.open_group(store=store, mode="w-", zarr_format=3)
    await group.update_attributes(root)  # attrs.update would write the group's zarr.json once per key

    async def make(name: str) -> None:
        arr = await group.create_array(name, **kwargs[name])
        if name in written:
            await arr.setitem(Ellipsis, written[name])

    done = await asyncio.gather(*(make(name) for name in kwargs), return_exceptions=True)  # all finish first
    failed = [err for err in done if isinstance(err, BaseException)]
    if failed:
        raise failed[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is not in the v3 spec (other readers ignore it)
        await zarr_async.consolidate_metadata(store)


def _created(spec: ArraySpec, layout: Layout, values: dict, sizes: dict) -> bool:
    """Whether ``create`` makes the declared array: not when its optional span, values or dimensions are absent
    (e.g. attention summaries or MoE routing of a run without them)."""
    if spec.span and not layout.has_span(spec.span):
        return False
    if spec.at_creation and spec.name not in values:
        if spec.required:
            raise StoreError(f"create needs the values of the required array {spec.name!r}.")
        return False
    return spec.required or set(spec.dims) <= set(sizes)


def _coordinate_links(made) -> dict[str, dict]:
    """name -> ``{"coordinates": "<aux coords>"}`` for each multi-dimensional array whose dimensions hold those of
    auxiliary coordinate arrays (CF convention, so xarray links them), set when the array is created."""
    coords = {spec.name: set(spec.dims) for spec in made if spec.coord}
    links = {}
    for spec in made:
        linked = [c for c, dims in coords.items() if dims <= set(spec.dims)]
        if spec.name not in coords and linked and len(spec.dims) > 1:
            links[spec.name] = {"coordinates": " ".join(linked)}
    return links


def _learn_sizes(spec: ArraySpec, value: np.ndarray, sizes: dict) -> None:
    """Check a creation-time value against the dimension sizes known so far; learn the new dimensions."""
    if value.ndim != len(spec.dims):
        raise StoreError(f"The values of {spec.name!r} must have {len(spec.dims)} dimensions {spec.dims}. "
                         f"Got shape {value.shape} instead.")
    for d, n in zip(spec.dims, value.shape):
        if sizes.setdefault(d, int(n)) != n:
            raise StoreError(f"The values of {spec.name!r} must have {sizes[d]} entries along {d!r} (dims "
                             f"{spec.dims}). Got shape {value.shape} instead.")


def consolidate(path):
    """Consolidated metadata (not in the v3 spec; other readers ignore it) lets xarray open at once."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def _root_attrs(layout: Layout, attrs: dict) -> dict:
    from gapcache import __version__

    base = {
        "schema_version": SCHEMA_VERSION,
        "checksums": checksums.ATTR_VALUE,
        "gapcache_version": __version__,
        "layer_convention": LAYER_CONVENTION,
        "sites": list(SITES),
        "samples_per_shard": layout.samples_per_shard,
        "visual_shard_tokens": layout.visual_shard_tokens,
        "span_shard_tokens": {name: s.shard_tokens for name, s in layout.spans.items()},
        "model_dtype": layout.model_dtype,
        "conditions": [c.to_dict() for c in layout.conditions],
    }
    clash = set(base) & set(attrs)
    if clash:
        raise StoreError(f"Store attributes {sorted(clash)} are reserved for gapcache itself.")
    merged = {**attrs, **base}
    json.dumps(merged)  # fail here, not half-way through a write, if something is not JSON
    return merged


class ShardPayload:
    """Everything one (condition, shard) unit writes: ``values`` maps unit-array names to their rows, in storage
    dtype: UNIT arrays (n, ...) for the shard's n samples, VUNIT arrays (group tokens, ...) from the shard's first
    visual offset. ``status`` (n,) is required; an optional array left out is not written (e.g. generation off).
    ``on_release``, if given, is called once when the writer no longer reads ``values`` (written, or dropped
    after an error): the producer may then reuse the buffers (a pool of shard buffers)."""

    def __init__(self, condition: int, shard: int, values: dict, on_release=None):
        self.condition, self.shard, self.values = condition, shard, values
        self.on_release = on_release
        for name in values:
            spec = arrays.get(name)
            if spec.along not in (arrays.UNIT, arrays.VUNIT):
                raise StoreError(f"A ShardPayload holds unit arrays only; {name!r} is written along {spec.along!r}.")
        if arrays.FLAG not in values:
            raise StoreError(f"A ShardPayload needs its {arrays.FLAG!r} flags.")

    @property
    def n(self) -> int:
        return len(self.values[arrays.FLAG])

    def release(self):
        """The writer is done with ``values``: call ``on_release`` (once)."""
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()

    def __getattr__(self, name):
        """``payload.gold_logprob``: the rows of a declared unit array, None when the payload leaves it out."""
        if name in arrays.ARRAYS and "values" in self.__dict__:
            return self.__dict__["values"].get(name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in arrays.ARRAYS and "values" in self.__dict__:
            self.__dict__["values"][name] = value
        else:
            super().__setattr__(name, value)


class StoreWriter:
    """Writes ShardPayloads to an existing store in a background thread (bounded queue).

    Hidden states go straight to their shard files (:mod:`gapcache.store.shardio`: the Zarr v3
    ``sharding_indexed`` format, atomic and fsynced, inner chunks compressed on ``threads``
    threads) when the store is a local directory whose state arrays use codecs shardio
    implements; otherwise, or with ``direct=False``, through zarr-python. ``direct`` maps each
    state array to its direct writer and ``fallback`` to the reason it goes through zarr.
    ``direct_io=False`` writes the shard files through the page cache even where O_DIRECT works.
    """

    def __init__(self, path, max_pending: int = 2, *, direct: bool = True, threads: int | None = None,
                 direct_io: bool = True):
        import zarr

        self.path = str(path)
        refuse_frozen(self.path)
        self.group = zarr.open_group(self.path, mode="r+", zarr_format=3)
        # every unit array the store has (an optional one a store lacks is simply never written)
        self.arrays = {s.name: self.group[s.name] for s in arrays.specs((arrays.UNIT, arrays.VUNIT)) if s.name in self.group}
        self.span_index = {name: span_index(self.group, name) for name in arrays.SPANS}
        self.spc = int(self.group.attrs["samples_per_shard"])
        self.span_shard = span_shard_tokens(self.group.attrs)
        self.direct: dict = {}
        self.fallback: dict[str, str] = {}
        for spec in arrays.specs((arrays.UNIT, arrays.VUNIT), state=True):
            name = spec.name
            if name not in self.arrays:  # an optional span this store does not hold
                continue
            if not direct:
                self.fallback[name] = "direct shard writes disabled (direct=False)"
                continue
            try:
                self.direct[name] = _direct_writer(self.arrays[name], self._shard_len(spec))
                self.direct[name].direct_io = direct_io
            except StoreError as err:
                self.fallback[name] = str(err)
                log.info("Writing %s through zarr-python: %s", name, err)
        self._root = _local_root(self.group)  # checksum records: local stores only
        self._pool = None
        if any(sa.compressed for sa in self.direct.values()):
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads or _cpu_count(), thread_name_prefix="gapcache-encode")
        self.bytes_written = 0  # payload bytes of hidden states written
        self.bytes_stored = 0  # shard file bytes written directly (zarr-path writes not counted)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gapcache-writer", daemon=True)
        self._thread.start()

    def status(self, condition: int) -> np.ndarray:
        return self.arrays["status"][condition, :]

    def pending(self, condition: int) -> list[int]:
        """Shards of ``condition`` with at least one sample not yet flagged done or failed."""
        st = self.status(condition)
        n_shards = -(-st.shape[0] // self.spc)
        return [s for s in range(n_shards) if (st[s * self.spc : (s + 1) * self.spc] == STATUS_PENDING).any()]

    def submit(self, payload: ShardPayload):
        self._raise()
        self._queue.put(payload)
        self._raise()

    def close(self):
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._raise()

    def __enter__(self):
        """Opening a writer on an existing store heals first: status chunks of fully flagged units that a killed
        writer left without their checksum record get it (``healed``: how many), before anything is written."""
        self.healed = self.heal_flag_records()
        return self

    def __exit__(self, *exc):
        self.close()

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise StoreError(f"Writing to {self.path} failed: {err!r}") from err

    def _run(self):
        """Writer thread: stages shard k+1 (encode, write) while the committer makes shard k durable."""
        commits: queue.Queue = queue.Queue()
        slots = threading.Semaphore(2)  # at most one shard committing and one being staged
        committer = threading.Thread(target=self._run_commits, args=(commits, slots), name="gapcache-commit",
                                     daemon=True)
        committer.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                slots.acquire()
                if self._error is not None:
                    slots.release()
                    item.release()
                    continue
                try:
                    staged = self._stage(item)
                except BaseException as err:  # surfaced on the next submit/close
                    self._error = err
                    slots.release()
                    item.release()
                    continue
                commits.put((item, staged))
        finally:
            commits.put(None)
            committer.join()

    def _run_commits(self, commits: queue.Queue, slots: threading.Semaphore):
        while True:
            job = commits.get()
            if job is None:
                return
            item, staged = job
            try:
                if self._error is None:
                    self._commit(item, staged)
                else:
                    _abort(staged)
            except BaseException as err:
                self._error = err
            finally:
                slots.release()
                item.release()  # its buffers may be reused now

    def write(self, p: ShardPayload):
        """Write one shard synchronously: states (durable on return when direct), scores, then the status flags."""
        try:
            self._commit(p, self._stage(p))
        finally:
            p.release()

    def _shard_len(self, spec) -> int:
        return self.spc if spec.along == arrays.UNIT else self.span_shard[spec.span]

    def _lead(self, spec, p: ShardPayload):
        """Index along the array's first dimension for ``p``'s condition (None: the array does not hold it)."""
        return p.condition if spec.along == arrays.UNIT else self.span_index[spec.span].get(p.condition)

    def _stage(self, p: ShardPayload) -> list:
        """Write the states of ``p``: direct shards to temporary files (returned), else through zarr."""
        staged = []
        try:
            for spec in arrays.specs((arrays.UNIT, arrays.VUNIT), state=True):
                rows, lead = p.values.get(spec.name), self._lead(spec, p)
                if rows is None or lead is None or spec.name not in self.arrays or not rows.shape[0]:
                    continue
                staged.append(self._put_states(spec.name, lead, p.shard, self._shard_len(spec), rows))
        except BaseException:
            _abort(staged)
            raise
        return [s for s in staged if s is not None]

    def _commit(self, p: ShardPayload, staged: list):
        """Make the staged shards durable and in place, then write the other unit arrays (each chunk's checksum
        recorded) and, last, the status flags that mark the unit done."""
        for i, s in enumerate(staged):
            try:
                self.bytes_stored += s.commit()
            except BaseException:
                _abort(staged[i + 1 :])
                raise
            self._record(*s.gapcache_record)
        s0 = p.shard * self.spc
        s1 = s0 + p.n
        for spec in arrays.specs((arrays.UNIT, arrays.VUNIT), state=False):
            rows, lead = p.values.get(spec.name), self._lead(spec, p)
            if spec.name == arrays.FLAG or rows is None or lead is None or spec.name not in self.arrays:
                continue
            arr = self.arrays[spec.name]
            if 0 in arr.shape:
                continue
            start = p.shard * self._shard_len(spec)
            arr[lead, start : start + rows.shape[0]] = rows
            self._record(spec.name, arr.metadata.encode_chunk_key((lead, p.shard) + (0,) * (arr.ndim - 2)))
        flags = self.arrays[arrays.FLAG]
        flags[p.condition, s0:s1] = p.values[arrays.FLAG]
        self._record(arrays.FLAG, flags.metadata.encode_chunk_key((p.condition, p.shard)))

    def heal_flag_records(self) -> int:
        """Record the status chunks of fully flagged units that have no checksum record: a writer killed
        between writing the flags and their record (the chunk's own crc32c still vouches for its bytes).
        Returns how many were recorded; call before writing (resume)."""
        if self._root is None:
            return 0
        flags = self.arrays[arrays.FLAG]
        status = flags[...]
        healed = 0
        for ci in range(status.shape[0]):
            for shard in range(-(-status.shape[1] // self.spc)):
                key = flags.metadata.encode_chunk_key((ci, shard))
                done = (status[ci, shard * self.spc : (shard + 1) * self.spc] != STATUS_PENDING).all()
                if done and not checksums.record_path(self._root / flags.path, key).is_file():
                    self._record(arrays.FLAG, key)
                    healed += 1
        return healed

    def _put_states(self, name: str, lead: int, shard: int, shard_len: int, rows: np.ndarray):
        """Rows of one whole shard (``lead``, rows from ``shard * shard_len``); the rest of it is padding.

        Direct: returns the staged shard (not yet in place). Through zarr: written now, returns None.
        """
        arr = self.arrays[name]
        rows = np.asarray(rows)
        start = shard * shard_len
        if rows.ndim != arr.ndim - 1 or rows.shape[1:] != arr.shape[2:] or rows.shape[0] > shard_len \
                or start + rows.shape[0] > arr.shape[1]:
            raise StoreError(
                f"The {name} rows of shard {shard} must have shape (<= {min(shard_len, arr.shape[1] - start)}, "
                f"{', '.join(map(str, arr.shape[2:]))}). Got {rows.shape} instead."
            )
        self.bytes_written += rows.nbytes
        sa = self.direct.get(name)
        coords = (lead, shard) + (0,) * (arr.ndim - 2)
        if sa is not None:
            staged = sa.stage(coords, rows[None], self._pool)
            # checksum of the staged file (of its bytes as written, else read back off the commit thread);
            # recorded once it is in place
            found = None if staged.tmp is None or self._root is None else \
                staged.crc or checksums.file_crc32c(staged.tmp)
            staged.gapcache_record = (name, sa.shard_key(coords), found)
            return staged
        arr[lead, start : start + rows.shape[0]] = rows
        self._record(name, arr.metadata.encode_chunk_key(coords))
        return None

    def _record(self, name: str, key: str, found=False):
        """Write the checksum record of ``key`` of array ``name`` (``found`` False: checksum the file now)."""
        if self._root is None:
            return
        array_dir = self._root / self.arrays[name].path
        algorithm = checksums.algorithm_for(arrays.get(name).is_state)
        if found is False:
            checksums.record_file(array_dir, key, algorithm)
        else:
            checksums.write_record(array_dir, key, found, algorithm)


def _abort(staged):
    for s in staged:
        if s is not None:
            s.abort()


def _direct_writer(arr, shard_len: int):
    """shardio writer of a state array whose shards each hold exactly one payload's rows."""
    from gapcache.store.shardio import ShardArray, UnsupportedShardFormat

    sa = ShardArray.open(arr)
    want = (1, shard_len) + tuple(arr.shape[2:])
    if sa.shape != tuple(arr.shape) or sa.shard_shape != want:
        raise UnsupportedShardFormat(
            f"{arr.path}: shards of shape {sa.shard_shape} (array {sa.shape}) do not hold one shard payload "
            f"each; expected shard shape {want}."
        )
    return sa


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def span_index(group, span: str = "visual") -> dict[int, int]:
    """condition index -> index along the span's condition dimension, for the conditions that record it."""
    labels = list(group["condition"][:])
    cdim = arrays.SPANS[span].condition_dim
    vlabels = list(group[cdim][:]) if cdim in group else []
    return {labels.index(v): i for i, v in enumerate(vlabels) if v in labels}


def visual_index(group) -> dict[int, int]:
    """condition index -> visual_condition index, for conditions whose visual states are cached."""
    return span_index(group, "visual")


def span_shard_tokens(attrs) -> dict[str, int]:
    """Rows per shard of every span (stores before ``span_shard_tokens``: the visual span's attribute)."""
    out = dict(attrs.get("span_shard_tokens") or {})
    out.setdefault("visual", int(attrs.get("visual_shard_tokens") or 0))
    return {name: int(out.get(name, 0)) for name in arrays.SPANS}


def refuse_frozen(path) -> None:
    """Raise StoreFrozenError if the store at ``path`` (local) carries the ``frozen`` attribute."""
    meta = os.path.join(str(path), "zarr.json")
    try:
        with open(meta) as f:
            frozen = (json.load(f).get("attributes") or {}).get("frozen")
    except (OSError, ValueError):
        return
    if frozen:
        raise StoreFrozenError(
            f"The store at {path} is frozen read-only (frozen {frozen.get('at', '?')} by `gapcache freeze`); "
            "writers refuse it. Extract into a new --out directory, or merge it with new stores into a new one "
            "(`gapcache merge`)."
        )


def _local_root(group):
    from zarr.storage import LocalStore

    store = getattr(group, "store", None)
    return Path(store.root) if isinstance(store, LocalStore) and not store.read_only else None


#: config fields that do not change a store's content (where or how fast it runs); never compared on resume
UNHASHED_FIELDS = ("extract.disk_bandwidth_mb_s", "extract.forward_seconds_per_batch")
#: config sections that fix a store's content
CONTENT_SECTIONS = ("model", "data", "extract")


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, a's value, b's value) of every leaf where two nested mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [(prefix, a, b)]


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def describe_differences(diffs, limit: int = 3) -> str:
    """'F is A in the store and B in this run; ...' for the first ``limit`` differing fields."""
    parts = [f"{f!r} is {_short(a)} in the store and {_short(b)} in this run" for f, a, b in diffs[:limit]]
    more = f" (and {len(diffs) - limit} more field(s))" if len(diffs) > limit else ""
    return "; ".join(parts) + more


def config_differences(stored_config: dict | None, config: dict) -> list[tuple[str, object, object]]:
    """The content fields (:data:`CONTENT_SECTIONS`, the batch size included: padding changes the
    stored values in the last float bits) where a store's config snapshot and a run's config differ."""
    stored_config = stored_config or {}
    diffs = []
    for section in CONTENT_SECTIONS:
        diffs += differences(stored_config.get(section), config.get(section), section)
    return [d for d in diffs if d[0] not in UNHASHED_FIELDS]


def check_compatible(path, attrs: dict, keys) -> None:
    """Refuse to resume into a store created from a different config: names each differing field
    (``extract.batch_size``, ``condition_params.blind_mean.mean_rgb``, ...) with both values."""
    from gapcache.store.reader import root_attrs

    existing = root_attrs(path)  # refuses an unknown schema version first
    for key in keys:
        if existing.get(key) == attrs.get(key):
            continue
        if key == "config_hash" and "config" in attrs:
            diffs = config_differences(existing.get("config"), attrs["config"]) or \
                [("config_hash", existing.get(key), attrs.get(key))]
        else:
            diffs = differences(existing.get(key), attrs.get(key), key) or [(key, existing.get(key), attrs.get(key))]
        raise IncompatibleStoreError(
            f"The store at {path} was created with a different {key!r}{' (config)' if key == 'config_hash' else ''}: "
            f"{describe_differences(diffs)}. "
            "Use a new --out directory, or rerun with the store's own config."
        )


SAME_SAMPLE_ON_RESUME = ("image_sha256", "question", "answer")


def check_same_samples(path, sample_ids, meta: dict) -> None:
    """Refuse to resume when the dataset now gives other samples than the store was created with
    (another order, a changed image, question or answer): a resumed run would mix two datasets.

    ``meta`` holds this run's per-sample arrays (at least :data:`SAME_SAMPLE_ON_RESUME`)."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    stored, planned = [str(v) for v in g["sample"][:]], [str(v) for v in sample_ids]
    if stored != planned:
        first = next((i for i, (a, b) in enumerate(zip(stored, planned)) if a != b), min(len(stored), len(planned)))
        raise IncompatibleStoreError(
            f"The store at {path} holds {len(stored)} samples and this run plans {len(planned)}; they differ "
            f"from position {first} (store has {stored[first:first + 1]}, this run has {planned[first:first + 1]}). "
            "The dataset changed since the store was created: use a new --out directory, or restore the dataset."
        )
    for name in SAME_SAMPLE_ON_RESUME:
        have, want = g[name][:], meta[name]
        bad = [i for i, (a, b) in enumerate(zip(have, want)) if str(a) != str(b)]
        if bad:
            i = bad[0]
            raise IncompatibleStoreError(
                f"The store at {path} was created from other data: {name!r} of sample {stored[i]!r} is "
                f"{str(have[i])!r} in the store and {str(want[i])!r} now ({len(bad)} of {len(stored)} samples "
                "differ). The dataset changed since the store was created (a default of the loader, an edited "
                "image or manifest): use a new --out directory, or restore the dataset."
            )
