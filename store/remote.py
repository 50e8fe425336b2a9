"""Stores over HTTP(S), S3 and other fsspec filesystems: always read-only, never copied.

Usage::

    open_store("http://host:8000/run/store.zarr")                       # consolidated metadata (no listing)
    open_store("s3://bucket/run/store.zarr", storage_options={"endpoint_url": "http://127.0.0.1:9000",
                                                              "key": "...", "secret": "..."})

Only ``zarr.json`` metadata (JSON) and chunk bytes (decoded by the Zarr v3 codecs) are read;
nothing is unpickled. HTTP servers cannot list directories, so the store's consolidated metadata
(written by ``create`` and refreshed by ``gapcache freeze``) is used when present.
"""

from __future__ import annotations

import re

from gapcache.errors import StoreError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def is_url(path) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    s = str(path)
    return bool(_URL.match(s)) and not s.startswith("file://")


def fsspec_store(url: str, storage_options: dict | None = None):
    """A read-only zarr ``FsspecStore`` for ``url`` (writes raise)."""
    try:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(url).rstrip("/"), storage_options=dict(storage_options or {}),
                                    read_only=True)
    except ImportError as err:  # e.g. aiohttp for http://, s3fs for s3://
        raise StoreError(f"Opening {url} needs an fsspec backend that is not installed: {err}. "
                         "Install aiohttp (http/https) or s3fs (s3://).") from None


def zarr_store(path, storage_options: dict | None = None):
    """What to hand zarr/xarray: a read-only FsspecStore for a URL, else the local path as a string."""
    if is_url(path):
        return fsspec_store(path, storage_options)
    if storage_options:
        raise StoreError(f"storage_options were given for the local path {path}; they apply to URLs only.")
    return str(path)


def fs_and_root(path, storage_options: dict | None = None):
    """(fsspec filesystem, root path in it) of a store URL or local path."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path).rstrip("/"), **dict(storage_options or {}))
    return fs, root


class KeyReader:
    """Read whole keys (``text_states/c/0/1/0/0/0``) of a local or remote store; None if absent."""

    def __init__(self, path, storage_options: dict | None = None):
        self.remote = is_url(path)
        if self.remote:
            self.fs, self.root = fs_and_root(path, storage_options)
        else:
            from pathlib import Path

            self.root = Path(path)

    def exists(self, key: str) -> bool:
        if not self.remote:
            return self.root.joinpath(*key.split("/")).is_file()
        try:
            return bool(self.fs.exists(f"{self.root}/{key}"))
        except OSError:
            return self.get(key) is not None

    def get(self, key: str) -> bytes | None:
        if not self.remote:
            try:
                return self.root.joinpath(*key.split("/")).read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        try:
            return self.fs.cat_file(f"{self.root}/{key}")
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as err:  # some HTTP servers answer 404 with other errors
            if "404" in str(err) or "Not Found" in str(err):
                return None
            raise
