"""Create a store and write it shard by shard, off the compute thread.

Usage::

    create(path, layout, attrs, sample_meta)        # once: shapes, provenance, per-sample metadata
    with StoreWriter(path) as w:                    # background threads do the writes
        for shard in w.pending(condition_index):    # resume: shards not yet done
            w.submit(ShardPayload(...))             # returns at once unless `max_pending` are queued

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
import threading
from dataclasses import dataclass

import numpy as np

from gapcache.errors import IncompatibleStoreError, StoreError
from gapcache.store import checksums, codec
from gapcache.store.schema import (
    LAYER_CONVENTION,
    SCHEMA_VERSION,
    SITES,
    STATUS_PENDING,
    Layout,
)

log = logging.getLogger(__name__)

STR = str  # zarr v3 variable-length UTF-8 strings (vlen-utf8)


def _array(group, name, shape, dtype, dims, chunks, shards=None, compressors="auto", fill=None, attrs=None):
    kw = dict(shape=shape, dtype=dtype, chunks=chunks, dimension_names=dims, attributes=attrs or {})
    if shards is not None:
        kw["shards"] = shards
    if compressors != "auto":
        kw["compressors"] = compressors
    if fill is not None:
        kw["fill_value"] = fill
    return group.create_array(name, **kw)


def create(path, layout: Layout, attrs: dict, sample_meta: dict, overwrite: bool = False):
    """Create the store at ``path`` with every array allocated (nothing written but metadata).

    ``sample_meta`` maps names to per-sample numpy arrays (first axis = sample), e.g. question,
    answer, category, label, image_sha256, site_position (sample, site), seq_len, visual_start.
    """
    import zarr

    if overwrite:
        refuse_frozen(path)
    g = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    g.attrs.update(_root_attrs(layout, attrs))
    _create_coords(g, layout)
    _create_states(g, layout)
    _create_scores(g, layout)
    _create_sample_meta(g, layout, sample_meta)
    _link_coordinates(g)
    _consolidate(path)
    return g


#: non-index coordinates, so that plain xarray shows them as coords, not data variables
AUX_COORDS = ("condition_kind", "truncation_layer", "truncation_strategy", "vtoken_sample", "vtoken_position")


def _link_coordinates(g):
    dims = {name: tuple(g[name].metadata.dimension_names) for name in AUX_COORDS}
    for name, arr in g.arrays():
        if name in AUX_COORDS or arr.metadata.dimension_names is None:
            continue
        own = set(arr.metadata.dimension_names)
        linked = [c for c, d in dims.items() if set(d) <= own]
        if linked and len(own) > 1:
            arr.attrs["coordinates"] = " ".join(linked)


def _consolidate(path):
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
        "model_dtype": layout.model_dtype,
        "conditions": [
            {"label": c.label, "kind": c.kind, "truncation_layer": c.truncation_layer, "strategy": c.strategy}
            for c in layout.conditions
        ],
    }
    clash = set(base) & set(attrs)
    if clash:
        raise StoreError(f"Store attributes {sorted(clash)} are reserved for gapcache itself.")
    merged = {**attrs, **base}
    json.dumps(merged)  # fail here, not half-way through a write, if something is not JSON
    return merged


def _create_coords(g, layout: Layout):
    spc, conds = layout.samples_per_shard, layout.conditions
    coords = {
        "sample": (np.array(layout.sample_ids, dtype=object), ("sample",), (spc,)),
        "condition": (np.array([c.label for c in conds], dtype=object), ("condition",), (len(conds),)),
        "condition_kind": (np.array([c.kind for c in conds], dtype=object), ("condition",), (len(conds),)),
        "truncation_layer": (np.array([c.truncation_layer for c in conds], "int32"), ("condition",), (len(conds),)),
        "truncation_strategy": (np.array([c.strategy for c in conds], dtype=object), ("condition",), (len(conds),)),
        "visual_condition": (
            np.array([c.label for c in layout.visual_conditions], dtype=object),
            ("visual_condition",),
            (max(1, len(layout.visual_conditions)),),
        ),
        "layer": (np.array(layout.layers, "int32"), ("layer",), (len(layout.layers),)),
        "site": (np.array(SITES, dtype=object), ("site",), (len(SITES),)),
        "candidate": (np.array(layout.candidates, dtype=object), ("candidate",), (max(1, len(layout.candidates)),)),
    }
    for name, (values, dims, chunks) in coords.items():
        dtype = STR if values.dtype == object else values.dtype
        arr = _array(g, name, values.shape, dtype, dims, chunks)
        if values.size:
            arr[...] = values
    _create_vtoken_coords(g, layout)


def _create_vtoken_coords(g, layout: Layout):
    owner = np.full(layout.n_vtokens, -1, np.int32)
    index = np.full(layout.n_vtokens, -1, np.int32)
    for i, (off, length) in enumerate(zip(layout.visual_offsets, layout.visual_lengths)):
        owner[off : off + length] = i
        index[off : off + length] = np.arange(length)
    chunks = (layout.visual_shard_tokens,)
    for name, values in (("vtoken_sample", owner), ("vtoken_position", index)):
        _array(g, name, values.shape, "int32", ("vtoken",), chunks, fill=-1)[...] = values


def _create_states(g, layout: Layout):
    dtype, encoding = codec.storage_for(layout.model_dtype)
    comp = codec.state_codecs(layout.compression_level)
    spc, nl, h = layout.samples_per_shard, len(layout.layers), layout.hidden
    attrs = {codec.ENCODING_ATTR: encoding, "model_dtype": layout.model_dtype}
    _array(
        g, "text_states", (len(layout.conditions), layout.n_samples, len(SITES), nl, h), dtype,
        ("condition", "sample", "site", "layer", "hidden"),
        chunks=(1, spc, 1, 1, h), shards=(1, spc, len(SITES), nl, h), compressors=comp, fill=0, attrs=attrs,
    )
    vc = layout.visual_chunk_tokens
    _array(
        g, "visual_states", (len(layout.visual_conditions), layout.n_vtokens, nl, h), dtype,
        ("visual_condition", "vtoken", "layer", "hidden"),
        chunks=(1, vc, 1, h), shards=(1, layout.visual_shard_tokens, nl, h), compressors=comp, fill=0, attrs=attrs,
    )


def _create_scores(g, layout: Layout):
    c, n, spc, k = len(layout.conditions), layout.n_samples, layout.samples_per_shard, len(layout.candidates)
    dims = ("condition", "sample")
    _array(g, "gold_logprob", (c, n), "float32", dims, (1, spc), fill=np.nan)
    _array(g, "candidate_logprob", (c, n, k), "float32", dims + ("candidate",), (1, spc, max(k, 1)), fill=np.nan)
    _array(g, "generation", (c, n), STR, dims, (1, spc))
    _array(g, "status", (c, n), "uint8", dims, (1, spc), fill=STATUS_PENDING)
    _array(g, "error", (c, n), STR, dims, (1, spc))


def _create_sample_meta(g, layout: Layout, sample_meta: dict):
    n, spc = layout.n_samples, layout.samples_per_shard
    required = {"visual_offset": np.array(layout.visual_offsets, np.int64),
                "visual_length": np.array(layout.visual_lengths, np.int32)}
    for name, values in {**sample_meta, **required}.items():
        values = np.asarray(values)
        if values.shape[:1] != (n,):
            raise StoreError(f"Per-sample metadata {name!r} must have {n} rows. Got shape {values.shape} instead.")
        dims = ("sample",) + {1: (), 2: ("site",) if name == "site_position" else ("candidate",)}[values.ndim]
        if values.ndim == 2 and values.shape[1] == 0:
            continue
        dtype = STR if values.dtype.kind in "OUS" else values.dtype
        _array(g, name, values.shape, dtype, dims, (spc,) + values.shape[1:])[...] = values


@dataclass
class ShardPayload:
    """Everything one (condition, shard) writes. Arrays are in storage dtype already."""

    condition: int
    shard: int
    text_states: np.ndarray  # (n, site, layer, hidden)
    visual_states: np.ndarray | None  # (group_tokens, layer, hidden) rows from the shard's first offset
    gold_logprob: np.ndarray  # (n,)
    candidate_logprob: np.ndarray  # (n, candidate)
    status: np.ndarray  # (n,) uint8
    error: np.ndarray  # (n,) object (str)
    generation: np.ndarray | None = None  # (n,) object (str)


#: per-sample arrays StoreWriter fills besides the hidden states (``status`` last)
SCORE_ARRAYS = ("gold_logprob", "candidate_logprob", "generation", "error", "status")
STATE_ARRAYS = ("text_states", "visual_states")


class StoreWriter:
    """Writes ShardPayloads to an existing store in a background thread (bounded queue).

    Hidden states go straight to their shard files (:mod:`gapcache.store.shardio`: the Zarr v3
    ``sharding_indexed`` format, atomic and fsynced, inner chunks compressed on ``threads``
    threads) when the store is a local directory whose state arrays use codecs shardio
    implements; otherwise, or with ``direct=False``, through zarr-python. ``direct`` maps each
    state array to its direct writer and ``fallback`` to the reason it goes through zarr.
    """

    def __init__(self, path, max_pending: int = 2, *, direct: bool = True, threads: int | None = None):
        import zarr

        self.path = str(path)
        refuse_frozen(self.path)
        self.group = zarr.open_group(self.path, mode="r+", zarr_format=3)
        self.arrays = {name: self.group[name] for name in (*STATE_ARRAYS, *SCORE_ARRAYS)}
        self.visual_index = _visual_index(self.group)
        self.spc = int(self.group.attrs["samples_per_shard"])
        self.vshard = int(self.group.attrs["visual_shard_tokens"])
        self.direct: dict = {}
        self.fallback: dict[str, str] = {}
        for name, shard_len in (("text_states", self.spc), ("visual_states", self.vshard)):
            if not direct:
                self.fallback[name] = "direct shard writes disabled (direct=False)"
                continue
            try:
                self.direct[name] = _direct_writer(self.arrays[name], shard_len)
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
                    continue
                try:
                    staged = self._stage(item)
                except BaseException as err:  # surfaced on the next submit/close
                    self._error = err
                    slots.release()
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

    def write(self, p: ShardPayload):
        """Write one shard synchronously: states (durable on return when direct), scores, then the status flags."""
        self._commit(p, self._stage(p))

    def _stage(self, p: ShardPayload) -> list:
        """Write the states of ``p``: direct shards to temporary files (returned), else through zarr."""
        staged = []
        try:
            staged.append(self._put_states("text_states", p.condition, p.shard, self.spc, p.text_states))
            vis = self.visual_index.get(p.condition)
            if vis is not None and p.visual_states is not None and p.visual_states.shape[0]:
                staged.append(self._put_states("visual_states", vis, p.shard, self.vshard, p.visual_states))
        except BaseException:
            _abort(staged)
            raise
        return [s for s in staged if s is not None]

    def _commit(self, p: ShardPayload, staged: list):
        """Make the staged shards durable and in place, then write the scores and, last, the status flags."""
        for i, s in enumerate(staged):
            try:
                self.bytes_stored += s.commit()
            except BaseException:
                _abort(staged[i + 1 :])
                raise
            self._record(*s.gapcache_record)
        a, s0 = self.arrays, p.shard * self.spc
        s1 = s0 + p.text_states.shape[0]
        a["gold_logprob"][p.condition, s0:s1] = p.gold_logprob
        if p.candidate_logprob.shape[1]:
            a["candidate_logprob"][p.condition, s0:s1] = p.candidate_logprob
        if p.generation is not None:
            a["generation"][p.condition, s0:s1] = p.generation
        a["error"][p.condition, s0:s1] = p.error
        if self._root is not None:  # records of the score chunks, before the flags that make the unit done
            for name in ("gold_logprob", "candidate_logprob", "generation", "error"):
                if name == "candidate_logprob" and not p.candidate_logprob.shape[1]:
                    continue
                if name == "generation" and p.generation is None:
                    continue
                arr = a[name]
                self._record(name, arr.metadata.encode_chunk_key((p.condition, p.shard) + (0,) * (arr.ndim - 2)))
        a["status"][p.condition, s0:s1] = p.status

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
            # checksum of the staged file (page cache, off the commit thread); recorded once it is in place
            found = None if staged.tmp is None or self._root is None else checksums.file_crc32c(staged.tmp)
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
        if found is False:
            checksums.record_file(array_dir, key)
        else:
            checksums.write_record(array_dir, key, found)


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


def _visual_index(group) -> dict[int, int]:
    """condition index -> visual_condition index, for conditions whose visual states are cached."""
    labels = list(group["condition"][:])
    vlabels = list(group["visual_condition"][:])
    return {labels.index(v): i for i, v in enumerate(vlabels) if v in labels}


class StoreFrozenError(StoreError):
    """The store was frozen read-only by ``gapcache freeze``; no writer may change it."""


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
    from pathlib import Path

    from zarr.storage import LocalStore

    store = getattr(group, "store", None)
    return Path(store.root) if isinstance(store, LocalStore) and not store.read_only else None


def check_compatible(path, attrs: dict, keys) -> None:
    """Refuse to resume into a store created from a different config (names the differing field)."""
    from gapcache.store.reader import root_attrs

    existing = root_attrs(path)  # refuses an unknown schema version first
    for key in keys:
        if existing.get(key) != attrs.get(key):
            raise IncompatibleStoreError(
                f"The store at {path} was created with a different {key!r}: "
                f"store has {existing.get(key)!r}, this run has {attrs.get(key)!r}. "
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
