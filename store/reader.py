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
from pathlib import Path

import numpy as np

from gapcache.errors import SchemaVersionError, StoreError
from gapcache.store import codec
from gapcache.store.schema import (
    STATUS_DONE,
    STATUS_FAILED,
    SUPPORTED_SCHEMA_VERSIONS,
)

STATE_ARRAYS = ("text_states", "visual_states")


def root_attrs(path, storage_options: dict | None = None) -> dict:
    """The store's root attributes, after checking it is a gapcache store of a known schema.

    ``path`` may be a URL (``http://``, ``s3://``, ...: opened read-only through fsspec).
    """
    import zarr

    from gapcache.store.remote import zarr_store

    try:
        group = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
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
    """
    import xarray as xr

    from gapcache.store.remote import is_url, zarr_store

    attrs = root_attrs(path, storage_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # "failed to open consolidated"
        if is_url(path):
            store = zarr_store(path, storage_options)
            try:
                ds = xr.open_zarr(store, consolidated=True, chunks={}, zarr_format=3)
            except (KeyError, FileNotFoundError, ValueError):  # no consolidated metadata: list the store
                ds = xr.open_zarr(store, consolidated=False, chunks={}, zarr_format=3)
        else:
            ds = xr.open_zarr(str(path), consolidated=False, chunks={}, zarr_format=3)
    ds.attrs = attrs
    if decode:
        for name in STATE_ARRAYS:
            var = ds[name]
            enc = var.attrs.get(codec.ENCODING_ATTR, "none")
            ds[name] = var.copy(data=codec.decode(var.data, enc))
            ds[name].attrs = {**var.attrs, codec.ENCODING_ATTR: "decoded"}
    return ds


def visual_span(ds, sample):
    """(vtoken, layer, hidden) states of one sample (index or id), for every visual condition."""
    i = int(sample) if isinstance(sample, (int, np.integer)) else list(ds.sample.values).index(sample)
    off, length = int(ds.visual_offset[i]), int(ds.visual_length[i])
    return ds.visual_states.isel(vtoken=slice(off, off + length))


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
    status = g["status"][...]
    labels = [str(x) for x in g["condition"][...]]
    per_cond = {
        label: {
            "done": int((status[i] == STATUS_DONE).sum()),
            "failed": int((status[i] == STATUS_FAILED).sum()),
            "pending": int((status[i] == 0).sum()),
        }
        for i, label in enumerate(labels)
    }
    return {
        "path": str(path) if is_url(path) else str(Path(path).resolve()),
        "schema_version": attrs["schema_version"],
        "gapcache_version": attrs.get("gapcache_version"),
        "model": attrs.get("model", {}),
        "dataset": attrs.get("dataset", {}),
        "conditions": per_cond,
        "n_samples": int(status.shape[1]),
        "n_failed_samples": int((status == STATUS_FAILED).any(axis=0).sum()),
        "complete": bool((status != 0).all()),
        "layers": [int(x) for x in g["layer"][...]],
        "sites": attrs.get("sites"),
        "hidden": int(g["text_states"].shape[-1]),
        "state_dtype": str(g["text_states"].dtype),
        "state_encoding": g["text_states"].attrs.get(codec.ENCODING_ATTR),
        "visual": attrs.get("visual", {}),
        "size_bytes": None if not size else _remote_size(path, storage_options) if is_url(path) else size_on_disk(path),
        "frozen": attrs.get("frozen"),
        "provenance": attrs.get("provenance", {}),
    }
