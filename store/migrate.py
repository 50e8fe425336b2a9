"""``gapcache migrate STORE``: upgrade a store written by an older gapcache to the current schema, in place.

Usage::

    gapcache migrate runs/q3/store.zarr      # stop every writer of the store first

Schema 1 -> 2: every array but the hidden states is rewritten with the ``crc32c`` codec in its chain
(creation-time arrays with every chunk stored), the checksum records of the rewritten unit chunks
are renewed, and ``schema_version`` becomes 2 last. The store must verify before (nothing damaged is
re-checksummed as if it were good) and verifies after. Hidden-state shards are not touched.

Crash-safe: each array is built beside the store (``.migrate.tmp/NAME``) and swapped in with two
renames (old -> ``.NAME.old``, new -> NAME); a rerun after a kill finishes or undoes a half-done swap.
Until the version is written the store stays a valid version-1 store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gapcache.errors import StoreError
from gapcache.store import arrays, checksums
from gapcache.store.schema import SCHEMA_VERSION

TMP_DIR = ".migrate.tmp"


def migrate(path) -> dict:
    """Upgrade the local store at ``path`` to SCHEMA_VERSION; returns what was done."""
    import zarr

    from gapcache.store.reader import root_attrs
    from gapcache.store.verify import verify
    from gapcache.store.writer import consolidate, refuse_frozen

    path = Path(path)
    refuse_frozen(path)
    _finish_swaps(path)
    version = int(root_attrs(path)["schema_version"])
    if version == SCHEMA_VERSION:
        return {"path": str(path), "from": version, "to": version, "arrays": []}
    rep = verify(path, allow_incomplete=True)
    if not rep.ok:
        raise StoreError(f"The store at {path} does not verify, so it is not migrated (its damaged bytes would be "
                         "checksummed as good):\n  " + "\n  ".join(rep.problems))
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    done = []
    for spec in arrays.specs(state=False):
        if spec.name in g:
            _rewrite(path, g[spec.name], spec)
            done.append(spec.name)
    shutil.rmtree(path / TMP_DIR, ignore_errors=True)
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    g.attrs["schema_version"] = SCHEMA_VERSION
    consolidate(path)
    after = verify(path, allow_incomplete=True)
    if not after.ok:  # pragma: no cover - a bug in the rewrite
        raise StoreError(f"The migrated store at {path} does not verify:\n  " + "\n  ".join(after.problems))
    return {"path": str(path), "from": version, "to": SCHEMA_VERSION, "arrays": done}


def _rewrite(path: Path, arr, spec) -> None:
    """Rebuild one array with the schema-2 codecs (same shape, chunks, fill, attributes) and swap it in."""
    import zarr

    from gapcache.store.writer import checked_codecs

    values = arr[...]
    tmp = zarr.open_group(str(path / TMP_DIR), mode="a", zarr_format=3)
    if spec.name in tmp:
        del tmp[spec.name]
    dtype = str if arr.dtype.kind in "OUT" else arr.dtype
    new = tmp.create_array(spec.name, shape=arr.shape, dtype=dtype, chunks=arr.chunks, fill_value=arr.fill_value,
                           dimension_names=arr.metadata.dimension_names, attributes=arr.attrs.asdict(),
                           **checked_codecs(spec))
    if new.size:
        new[...] = values
    if spec.along in (arrays.UNIT, arrays.VUNIT):  # renew the records: every chunk now stored, every key recorded
        new_dir = path / TMP_DIR / spec.name
        keys = {rec.name[: -len(".json")].replace(".", "/") for rec in (path / spec.name / checksums.DIRNAME).glob("*.json")}
        keys |= {str(f.relative_to(new_dir)) for f in (new_dir / "c").rglob("*") if f.is_file()}
        for key in sorted(keys):
            algorithm = checksums.algorithm_for(spec.is_state)
            checksums.write_record(new_dir, key, checksums.file_digest(new_dir / Path(*key.split("/")), algorithm),
                                   algorithm)
    old = path / f".{spec.name}.old"
    os.rename(path / spec.name, old)
    os.rename(path / TMP_DIR / spec.name, path / spec.name)
    shutil.rmtree(old)


def _finish_swaps(path: Path) -> None:
    """After a kill mid-swap: a finished swap drops the old copy, an unfinished one puts it back."""
    for old in path.glob(".*.old"):
        name = old.name[1 : -len(".old")]
        if (path / name / "zarr.json").is_file():
            shutil.rmtree(old)
        else:
            shutil.rmtree(path / name, ignore_errors=True)
            os.rename(old, path / name)
    shutil.rmtree(path / TMP_DIR, ignore_errors=True)
