"""``gapcache verify`` and ``gapcache freeze``: check a store; make a finished one read-only.

Usage::

    report = verify("run/store.zarr")        # or a URL (read-only)
    report.ok, report.problems                # each problem names the array, key, condition and samples
    freeze("run/store.zarr")                  # consolidate, attrs['frozen'], chmod a-w; writers refuse it

verify checks, iterating over the declared arrays (:mod:`gapcache.store.arrays`): (1) the schema:
every required array with its dimensions and consistent sizes, portable codecs only (nothing that
could unpickle), known status values; (2) completeness: no (condition, sample) left pending; (3)
integrity of every byte: every chunk of every array but the hidden states decodes (schema 2: each
carries a ``crc32c`` codec, so a flipped bit is a checksum mismatch) and, for the arrays written at
creation, exists; every hidden-state shard and unit chunk with a checksum record (written at commit
time, :mod:`gapcache.store.checksums`) has the recorded size and CRC-32C, and every flagged unit has
its records, so a flipped byte, a truncated shard and a missing shard are each named with the array
and the chunk key. Stores written before checksums existed are checked by decoding.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gapcache.errors import StoreError
from gapcache.store import arrays, checksums
from gapcache.store.reader import DECODE_ERRORS, damaged_chunks
from gapcache.store.remote import KeyReader, is_url, zarr_store
from gapcache.store.schema import SITES, STATUS_DONE, STATUS_FAILED, STATUS_NAMES, STATUS_PENDING, STORE_NAME
#: core Zarr v3 codecs: none of them can execute or unpickle anything
PORTABLE_CODECS = {"bytes", "zstd", "gzip", "blosc", "crc32c", "sharding_indexed", "vlen-utf8", "vlen-bytes",
                   "transpose"}


@dataclass
class Report:
    path: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"store    {self.path}"]
        lines += [f"checked  {k}: {v}" for k, v in self.checked.items()]
        lines += [f"warning  {w}" for w in self.warnings]
        lines += [f"PROBLEM  {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "warnings": self.warnings,
                "checked": self.checked}


def _codec_names(codecs) -> set[str]:
    found = set()
    for c in codecs or ():
        c = c if isinstance(c, dict) else c.to_dict()
        found.add(c["name"])
        cfg = c.get("configuration") or {}
        found |= _codec_names(cfg.get("codecs")) | _codec_names(cfg.get("index_codecs"))
    return found


def verify(path, storage_options: dict | None = None, *, allow_incomplete: bool = False,
           deep: bool = False) -> Report:
    """Check schema, completeness and checksums of the store at ``path`` (local or URL, read-only)."""
    import zarr

    from gapcache.store.reader import root_attrs

    rep = Report(str(path))
    try:
        attrs = root_attrs(path, storage_options)
        g = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
    except StoreError as err:
        rep.problems.append(str(err))
        return rep
    if not is_url(path):
        _check_tree(Path(path), rep)
    found = _check_schema(g, attrs, rep)
    _check_chunks(path, storage_options, g, attrs, found, rep)
    if arrays.FLAG not in found or "text_states" not in found or any(p.startswith("array 'status'") for p in rep.problems):
        return rep
    status = found[arrays.FLAG][...]
    try:
        labels = [str(x) for x in found["condition"][...]] if "condition" in found else []
    except DECODE_ERRORS:
        labels = []
    known = sorted(STATUS_NAMES)
    if not np.isin(status, known).all():
        rep.problems.append(f"status holds values other than {known} ({STATUS_NAMES}): "
                            f"{sorted(set(np.unique(status).tolist()) - set(known))}")
    pending = (status == STATUS_PENDING).sum(axis=1)
    rep.checked["samples done/failed/pending"] = (f"{int((status == STATUS_DONE).sum())}/"
                                                 f"{int((status == STATUS_FAILED).sum())}/{int(pending.sum())}")
    for ci, n in enumerate(pending):
        if n:
            msg = f"incomplete: condition {labels[ci] if ci < len(labels) else ci!r} has {int(n)} pending sample(s)"
            (rep.warnings if allow_incomplete else rep.problems).append(msg)
    _check_shards(path, storage_options, g, attrs, found, status, labels, rep, deep)
    return rep


def _check_tree(root: Path, rep: Report) -> None:
    """No symlinks (they could point outside the run directory); leftovers of interrupted writers (staged
    ``.*.tmp`` files inside the store; beside a store named ``store.zarr``, in its run directory, the
    directory of an interrupted creation and lock files) are reported with their size and owner."""
    from gapcache.store.locks import describe_leftovers, leftovers

    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                rep.problems.append(f"symlink inside the store: {p.relative_to(root)} -> {os.readlink(p)} "
                                    "(a store must hold its own files)")
    found = leftovers(root.parent, root)
    if root.name != STORE_NAME:  # not in a run directory: only what lies inside the store is ours
        found = [f for f in found if f.kind == "staged file"]
    rep.warnings += describe_leftovers(found)  # harmless for readers, who never look at them


def _check_schema(g, attrs, rep: Report) -> dict:
    """Every declared array the store's schema version requires, with its dimensions; consistent sizes."""
    version = int(attrs.get("schema_version", 1))
    found, sizes = {}, {}
    declared = arrays.specs(version=version)
    for spec in declared:
        if spec.name not in g:
            if spec.required:
                rep.problems.append(f"schema: array {spec.name!r} is missing")
            continue
        arr = g[spec.name]
        found[spec.name] = arr
        got = tuple(arr.metadata.dimension_names or ())
        if got != spec.dims:
            rep.problems.append(f"schema: {spec.name} has dimensions {got}; expected {spec.dims}")
            continue
        for d, n in zip(spec.dims, arr.shape):
            if d in ("visual_condition", "candidate") and n == 1 and sizes.get(d) == 0:
                continue
            if sizes.setdefault(d, n) != n:
                rep.problems.append(f"schema: dimension {d!r} has size {n} in {spec.name} but {sizes[d]} elsewhere")
    undeclared = sorted(name for name, _ in g.arrays() if name not in arrays.ARRAYS)
    if undeclared:
        rep.warnings.append(f"arrays not declared by this gapcache (written by a newer one?), not checked: {undeclared}")
    for name, arr in g.arrays():
        bad = _codec_names(arr.metadata.to_dict().get("codecs")) - PORTABLE_CODECS
        if bad:
            rep.problems.append(f"schema: {name} uses codecs {sorted(bad)} outside the portable Zarr v3 set")
    try:
        if "site" in found and [str(x) for x in found["site"][...]] != list(SITES):
            rep.problems.append(f"schema: site coordinate is not {list(SITES)}")
    except DECODE_ERRORS:
        pass  # damaged: named by _check_chunks
    spc = attrs.get("samples_per_shard")
    if "text_states" in found and spc and found["text_states"].shards and found["text_states"].shards[1] != spc:
        rep.problems.append(f"schema: text_states shards hold {found['text_states'].shards[1]} samples, "
                            f"attrs say samples_per_shard = {spc}")
    _check_spans(found, rep)
    rep.checked["schema"] = f"{len(found)} declared arrays ({sum(s.required for s in declared)} required), version {version}"
    return found


def _check_spans(found, rep: Report) -> None:
    """Each span's offsets/lengths point inside its token axis, at rows its owner array gives the sample."""
    for sp in arrays.SPANS.values():
        if not {sp.offset, sp.length, sp.owner} <= set(found):
            continue
        try:
            off, length = found[sp.offset][...], found[sp.length][...]
            owner = found[sp.owner][...]
        except DECODE_ERRORS:
            continue  # damaged: named by _check_chunks
        if (off + length > owner.shape[0]).any() or (off < 0).any():
            rep.problems.append(f"schema: {sp.offset}/{sp.length} point outside the {sp.token_dim} axis")
            continue
        for i, (o, n) in enumerate(zip(off, length)):
            if n and not (owner[o : o + n] == i).all():
                rep.problems.append(f"schema: {sp.owner} disagrees with {sp.offset}/{sp.length} for sample {i}")
                break


def _check_chunks(path, storage_options, g, attrs, found, rep: Report) -> None:
    """Every chunk of every array but the hidden states decodes (crc32c codec: a flipped bit fails); from
    schema 2 on, every chunk of an array written at creation exists (a deleted one would read as fill)."""
    version = int(attrs.get("schema_version", 1))
    reader = KeyReader(path, storage_options)
    n_arrays = n_chunks = 0
    unprotected = []
    for spec in arrays.specs(state=False):
        arr = found.get(spec.name)
        if arr is None:
            continue
        n_arrays += 1
        if "crc32c" not in _codec_names(arr.metadata.to_dict().get("codecs")):
            unprotected.append(spec.name)
        for key, err in damaged_chunks(arr):
            msg = str(err).rstrip(".")
            rep.problems.append(f"array {spec.name!r} chunk {key}: cannot be decoded ({type(err).__name__}: {msg}): "
                                "damaged bytes")
        if version >= 2 and spec.at_creation and arr.size:
            grid = arr.chunks
            for c in np.ndindex(*[-(-n // s) for n, s in zip(arr.shape, grid)]):
                key = arr.metadata.encode_chunk_key(c)
                n_chunks += 1
                if not reader.exists(f"{arr.path}/{key}"):
                    rep.problems.append(f"array {spec.name!r} chunk {key}: missing (every chunk of an array written "
                                        "at creation is stored; it was deleted)")
    rep.checked["arrays"] = f"{n_arrays} non-state arrays decoded chunk by chunk" + (
        f", {n_chunks} creation-time chunks present" if version >= 2 else "")
    if unprotected:
        rep.warnings.append(f"{len(unprotected)} array(s) carry no crc32c codec (schema {version}): a flipped bit in "
                            f"them may go unnoticed: {unprotected}. Run `gapcache migrate {path}` to add checksums.")


def _check_shards(path, storage_options, g, attrs, found, status, labels, rep: Report, deep: bool) -> None:
    """Checksum records of every unit chunk / state shard (written at commit time) against the files."""
    from gapcache.store.writer import span_index, span_shard_tokens

    reader = KeyReader(path, storage_options)
    recorded = bool(attrs.get(checksums.ATTR))
    spc = int(attrs.get("samples_per_shard") or found["text_states"].shards[1])
    shard_tokens = span_shard_tokens(attrs)
    n_cond, n = status.shape
    n_shards = -(-n // spc)
    span_of, span_len = {}, {}  # per span: condition -> span-condition index; per-sample lengths
    for name, sp in arrays.SPANS.items():
        try:
            span_of[name] = span_index(g, name) if sp.condition_dim in found and labels else {}
            span_len[name] = found[sp.length][...] if sp.length in found else np.zeros(n, int)
        except DECODE_ERRORS:  # damaged (named by _check_chunks): the span's shards cannot be located
            span_of[name], span_len[name] = {}, np.zeros(n, int)
            rep.warnings.append(f"{sp.states} shards not checked: {sp.condition_dim}/{sp.length} are damaged")
    version = int(attrs.get("schema_version", 1))  # status chunks are recorded from schema 2 on
    unit_specs = [s for s in arrays.specs((arrays.UNIT, arrays.VUNIT)) if s.name in found
                  and (s.name != arrays.FLAG or version >= 2) and 0 not in found[s.name].shape[2:]]
    n_ok = n_records = 0
    for ci in range(n_cond):
        for shard in range(n_shards):
            s0, s1 = shard * spc, min((shard + 1) * spc, n)
            flagged = bool((status[ci, s0:s1] != STATUS_PENDING).all())
            where = f"condition {labels[ci] if ci < len(labels) else ci!r}, samples {s0}..{s1 - 1}"
            for spec in unit_specs:
                arr = found[spec.name]
                if spec.along == arrays.UNIT:
                    lead, required = ci, spec.every_unit
                else:
                    if ci not in span_of[spec.span] or not shard_tokens[spec.span]:
                        continue
                    lead = span_of[spec.span][ci]
                    required = bool(span_len[spec.span][s0:s1].sum()) and spec.every_unit
                coords = (lead, shard) + (0,) * (arr.ndim - 2)
                key = arr.metadata.encode_chunk_key(coords)
                label = f"{spec.name} shard {key} ({where})"
                ok, had = _check_record(reader, arr, key, label, rep, recorded=recorded, flagged=flagged,
                                        required=required)
                n_records += had
                n_ok += ok
                if (not had and flagged and (deep or not recorded)) or (ok and deep):
                    _decode(arr, coords, label, rep)
    rep.checked["checksums"] = f"{n_ok} of {n_records} recorded shard/chunk files match" + (
        "" if recorded else " (store written before checksums were recorded: decoded instead)")


def _check_record(reader, arr, key, label, rep: Report, *, recorded, flagged, required) -> tuple[bool, bool]:
    """(file matches its record, a record exists) for one unit chunk / shard; problems appended to ``rep``."""
    raw = reader.get(f"{arr.path}/{checksums.DIRNAME}/{checksums.record_name(key)}")
    if raw is None:
        if recorded and flagged and required:
            rep.problems.append(f"{label}: no checksum record although the samples are flagged done "
                                "(the shard was never committed, or its record was deleted; a writer killed right "
                                "after flagging: rerun the extraction, which records it)")
        return False, False
    try:
        rec = json.loads(raw)
        algorithm = checksums.record_algorithm(rec)
        want, want_n = rec[algorithm], int(rec["nbytes"])
    except (ValueError, KeyError, TypeError):
        rep.problems.append(f"{label}: unreadable checksum record")
        return False, True
    data = reader.get(f"{arr.path}/{key}")
    if want is None:
        if data is not None:
            rep.problems.append(f"{label}: file present ({len(data)} bytes) but recorded as holding no data")
            return False, True
        return True, True
    if data is None:
        rep.problems.append(f"{label}: shard file missing (recorded {want_n} bytes)")
    elif len(data) < want_n:
        rep.problems.append(f"{label}: shard file truncated ({len(data)} of {want_n} bytes)")
    elif len(data) != want_n:
        rep.problems.append(f"{label}: shard file has {len(data)} bytes, recorded {want_n}")
    elif (found := checksums.digest(data, algorithm)) != want:
        shown = (lambda x: f"{x:#010x}") if algorithm == checksums.ALGORITHM else (lambda x: x[:16])
        rep.problems.append(f"{label}: checksum mismatch (recorded {algorithm} {shown(want)}, found "
                            f"{shown(found)}): corrupted bytes")
    else:
        return True, True
    return False, True


def _decode(arr, coords, label, rep: Report) -> None:
    """Read a shard through zarr (catches what the codecs detect: index crc32c, broken zstd frames)."""
    shape = arr.shards or arr.chunks
    sl = tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, shape, arr.shape))
    try:
        arr[sl]
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        rep.problems.append(f"{label}: cannot be decoded: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------- freeze
def freeze(path, *, allow_incomplete: bool = False) -> dict:
    """Consolidate metadata, mark ``attrs['frozen']``, and make every file and directory read-only."""
    import zarr

    from gapcache import __version__
    from gapcache.store.reader import root_attrs
    from gapcache.store.writer import consolidate, refuse_frozen

    path = Path(path)
    if is_url(path):
        raise StoreError(f"Only a local store can be frozen. Got {path} instead.")
    refuse_frozen(path)
    root_attrs(path)
    rep = verify(path, allow_incomplete=allow_incomplete)
    if not rep.ok:
        raise StoreError(f"The store at {path} does not verify; it is not frozen:\n  " + "\n  ".join(rep.problems)
                         + ("\n(pass --allow-incomplete to freeze a store with pending samples)"
                            if any(p.startswith("incomplete") for p in rep.problems) else ""))
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    frozen = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gapcache_version": __version__,
              "complete": not any(w.startswith("incomplete") for w in rep.warnings)}
    g.attrs["frozen"] = frozen
    consolidate(path)
    n = 0
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
                n += 1
        if not os.path.islink(dirpath):
            os.chmod(dirpath, os.stat(dirpath).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return {"path": str(path), "frozen": frozen, "files": n}


def unfreeze_permissions(path) -> None:
    """Give the owner write permission back (for deleting a frozen store: ``rm -rf`` needs it)."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
