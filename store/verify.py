"""``gapcache verify`` and ``gapcache freeze``: check a store; make a finished one read-only.

Usage::

    report = verify("run/store.zarr")        # or a URL (read-only)
    report.ok, report.problems                # each problem names the array, key, condition and samples
    freeze("run/store.zarr")                  # consolidate, attrs['frozen'], chmod a-w; writers refuse it

verify checks (1) the schema: the arrays of the contract with their dimensions and consistent
sizes, portable codecs only (nothing that could unpickle), known status values; (2)
completeness: no (condition, sample) left pending; (3) integrity: every shard/chunk file with a
checksum record (written at commit time, :mod:`gapcache.store.checksums`) has the recorded size
and CRC-32C, and every flagged unit has its records, so a flipped byte, a truncated shard and a
missing shard are each named. Stores written before checksums existed are checked by decoding.
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
from gapcache.store import checksums
from gapcache.store.remote import KeyReader, is_url, zarr_store
from gapcache.store.schema import SITES, STATUS_PENDING

#: array -> dimension names the contract fixes
CONTRACT = {
    "text_states": ("condition", "sample", "site", "layer", "hidden"),
    "visual_states": ("visual_condition", "vtoken", "layer", "hidden"),
    "gold_logprob": ("condition", "sample"),
    "candidate_logprob": ("condition", "sample", "candidate"),
    "generation": ("condition", "sample"),
    "status": ("condition", "sample"),
    "error": ("condition", "sample"),
    "sample": ("sample",), "condition": ("condition",), "visual_condition": ("visual_condition",),
    "layer": ("layer",), "site": ("site",), "candidate": ("candidate",),
    "visual_offset": ("sample",), "visual_length": ("sample",),
    "vtoken_sample": ("vtoken",), "vtoken_position": ("vtoken",),
}
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
    arrays = _check_schema(g, attrs, rep)
    if "status" not in arrays or "text_states" not in arrays:
        return rep
    status = arrays["status"][...]
    labels = [str(x) for x in arrays["condition"][...]] if "condition" in arrays else []
    if not np.isin(status, (0, 1, 2)).all():
        rep.problems.append(f"status holds values other than 0/1/2: {sorted(set(np.unique(status).tolist()) - {0, 1, 2})}")
    pending = (status == STATUS_PENDING).sum(axis=1)
    rep.checked["samples done/failed/pending"] = f"{int((status == 1).sum())}/{int((status == 2).sum())}/{int(pending.sum())}"
    for ci, n in enumerate(pending):
        if n:
            msg = f"incomplete: condition {labels[ci] if ci < len(labels) else ci!r} has {int(n)} pending sample(s)"
            (rep.warnings if allow_incomplete else rep.problems).append(msg)
    _check_shards(path, storage_options, g, attrs, arrays, status, labels, rep, deep)
    return rep


def _check_tree(root: Path, rep: Report) -> None:
    """No symlinks (they could point outside the run directory); stray temporary files are reported."""
    strays = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                rep.problems.append(f"symlink inside the store: {p.relative_to(root)} -> {os.readlink(p)} "
                                    "(a store must hold its own files)")
            elif name.endswith(".tmp") and name.startswith("."):
                strays += 1
    if strays:
        rep.warnings.append(f"{strays} stray temporary file(s) from interrupted writes (harmless; ignored by readers)")


def _check_schema(g, attrs, rep: Report) -> dict:
    arrays, sizes = {}, {}
    for name, dims in CONTRACT.items():
        try:
            arr = g[name]
        except KeyError:
            rep.problems.append(f"schema: array {name!r} is missing")
            continue
        arrays[name] = arr
        got = tuple(arr.metadata.dimension_names or ())
        if got != dims:
            rep.problems.append(f"schema: {name} has dimensions {got}; expected {dims}")
            continue
        for d, n in zip(dims, arr.shape):
            if d in ("visual_condition", "candidate") and n == 1 and sizes.get(d) == 0:
                continue
            if sizes.setdefault(d, n) != n:
                rep.problems.append(f"schema: dimension {d!r} has size {n} in {name} but {sizes[d]} elsewhere")
    for name, arr in g.arrays():
        bad = _codec_names(arr.metadata.to_dict().get("codecs")) - PORTABLE_CODECS
        if bad:
            rep.problems.append(f"schema: {name} uses codecs {sorted(bad)} outside the portable Zarr v3 set")
    if "site" in arrays and [str(x) for x in arrays["site"][...]] != list(SITES):
        rep.problems.append(f"schema: site coordinate is not {list(SITES)}")
    spc = attrs.get("samples_per_shard")
    if "text_states" in arrays and spc and arrays["text_states"].shards and arrays["text_states"].shards[1] != spc:
        rep.problems.append(f"schema: text_states shards hold {arrays['text_states'].shards[1]} samples, "
                            f"attrs say samples_per_shard = {spc}")
    if {"visual_offset", "visual_length", "vtoken_sample"} <= set(arrays):
        off, length = arrays["visual_offset"][...], arrays["visual_length"][...]
        owner = arrays["vtoken_sample"][...]
        if (off + length > owner.shape[0]).any() or (off < 0).any():
            rep.problems.append("schema: visual_offset/visual_length point outside the vtoken axis")
        else:
            for i, (o, n) in enumerate(zip(off, length)):
                if n and not (owner[o : o + n] == i).all():
                    rep.problems.append(f"schema: vtoken_sample disagrees with visual_offset/length for sample {i}")
                    break
    rep.checked["schema"] = f"{len(arrays)}/{len(CONTRACT)} contract arrays"
    return arrays


def _check_shards(path, storage_options, g, attrs, arrays, status, labels, rep: Report, deep: bool) -> None:
    reader = KeyReader(path, storage_options)
    recorded = bool(attrs.get(checksums.ATTR))
    spc = int(attrs.get("samples_per_shard") or arrays["text_states"].shards[1])
    vshard = int(attrs.get("visual_shard_tokens") or 0)
    n_cond, n = status.shape
    n_shards = -(-n // spc)
    from gapcache.store.writer import _visual_index

    vis_of = _visual_index(g) if "visual_condition" in arrays and labels else {}
    vlen = arrays["visual_length"][...] if "visual_length" in arrays else np.zeros(n, int)
    arrs = {name: g[name] for name in ("text_states", "gold_logprob", "candidate_logprob", "error", "generation",
                                       "visual_states") if name in g}  # metadata read once, not per shard
    n_ok = n_records = 0
    for ci in range(n_cond):
        for shard in range(n_shards):
            s0, s1 = shard * spc, min((shard + 1) * spc, n)
            flagged = bool((status[ci, s0:s1] != STATUS_PENDING).all())
            where = f"condition {labels[ci] if ci < len(labels) else ci!r}, samples {s0}..{s1 - 1}"
            keys = []  # (array, chunk coords, required)
            for name in ("text_states", "gold_logprob", "candidate_logprob", "error", "generation"):
                if name not in arrs or (name == "candidate_logprob" and arrs[name].shape[2] == 0):
                    continue
                keys.append((name, (ci, shard) + (0,) * (arrs[name].ndim - 2), name != "generation"))
            if ci in vis_of and "visual_states" in arrs and vshard:
                keys.append(("visual_states", (vis_of[ci], shard, 0, 0), bool(vlen[s0:s1].sum())))
            for name, coords, required in keys:
                arr = arrs[name]
                key = arr.metadata.encode_chunk_key(coords)
                raw = reader.get(f"{arr.path}/{checksums.DIRNAME}/{checksums.record_name(key)}")
                label = f"{name} shard {key} ({where})"
                if raw is None:
                    if recorded and flagged and required:
                        rep.problems.append(f"{label}: no checksum record although the samples are flagged done "
                                            "(the shard was never committed, or its record was deleted)")
                    elif flagged and (deep or not recorded):
                        _decode(arr, coords, label, rep)
                    continue
                n_records += 1
                try:
                    rec = json.loads(raw)
                    want_crc, want_n = rec[checksums.ALGORITHM], int(rec["nbytes"])
                except (ValueError, KeyError, TypeError):
                    rep.problems.append(f"{label}: unreadable checksum record")
                    continue
                data = reader.get(f"{arr.path}/{key}")
                if want_crc is None:
                    if data is not None:
                        rep.problems.append(f"{label}: file present ({len(data)} bytes) but recorded as holding no data")
                    else:
                        n_ok += 1
                    continue
                if data is None:
                    rep.problems.append(f"{label}: shard file missing (recorded {want_n} bytes)")
                elif len(data) < want_n:
                    rep.problems.append(f"{label}: shard file truncated ({len(data)} of {want_n} bytes)")
                elif len(data) != want_n:
                    rep.problems.append(f"{label}: shard file has {len(data)} bytes, recorded {want_n}")
                elif (found := checksums.crc32c_update(data)) != want_crc:
                    rep.problems.append(f"{label}: checksum mismatch (recorded crc32c {want_crc:#010x}, found "
                                        f"{found:#010x}): corrupted bytes")
                else:
                    n_ok += 1
                    if deep:
                        _decode(arr, coords, label, rep)
    rep.checked["checksums"] = f"{n_ok} of {n_records} recorded shard/chunk files match" + (
        "" if recorded else " (store written before checksums were recorded: decoded instead)")


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
    from gapcache.store.writer import _consolidate, refuse_frozen

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
    _consolidate(path)
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
