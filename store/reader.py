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


def root_attrs(path) -> dict:
    """The store's root attributes, after checking it is a gapcache store of a known schema."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
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


def open_store(path, decode: bool = True):
    """Lazy xarray view of a store; hidden states decoded to float32 when ``decode``."""
    import xarray as xr

    attrs = root_attrs(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # "failed to open consolidated"
        ds = xr.open_zarr(str(path), consolidated=False, chunks={})
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


def info(path) -> dict:
    """Summary of a store: the keys `gapcache info --json` prints."""
    import zarr

    attrs = root_attrs(path)
    g = zarr.open_group(str(path), mode="r", zarr_format=3)
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
        "path": str(Path(path).resolve()),
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
        "size_bytes": size_on_disk(path),
        "provenance": attrs.get("provenance", {}),
    }
