"""Per-shard checksums, recorded when a shard is committed and checked by ``gapcache verify``.

One small JSON record per (array, chunk/shard key), next to the array's chunks::

    store.zarr/text_states/checksums/c.0.3.0.0.0.json   {"key": "c/0/3/0/0/0", "crc32c": 123, "nbytes": 4567}

A writer only ever writes the records of the shards it owns (tmp file + rename, after the shard
itself is in place and before the unit's ``status`` flags), so concurrent writers of different
shards never touch the same file and a process killed at any point leaves either no record or a
record of the shard file as it is on disk. A key that holds no data (an all-fill-value chunk that
zarr does not store, or an empty shard) is recorded with ``"crc32c": null, "nbytes": 0``.

Zarr readers never look inside an array's directory except at ``zarr.json`` and chunk keys
(``c/...``), so the records are invisible to zarr and xarray and travel with the store (cp,
rsync, S3 sync). Checksum of the whole file as stored: CRC-32C (Castagnoli) for hidden-state shards
(fast on gigabytes); SHA-256 (``{"sha256": "<hex>"}``) for the chunks of the other unit arrays, which
from schema 2 on end with their own CRC-32C (zarr's ``crc32c`` codec): the CRC-32C of a message
followed by its own CRC-32C is one constant (the CRC residue, 0x48674bc7), so a whole-file CRC-32C
could not tell two valid chunks apart and would miss an edit made through zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gapcache.store.locks import tmp_name

ALGORITHM = "crc32c"  # hidden-state shards
CHUNK_ALGORITHM = "sha256"  # chunks that carry their own crc32c codec
ALGORITHMS = (ALGORITHM, CHUNK_ALGORITHM)
DIRNAME = "checksums"
ATTR = "checksums"  # root attribute describing the records (set by ``create``)
ATTR_VALUE = {"algorithm": ALGORITHM, "chunk_algorithm": CHUNK_ALGORITHM, "scope": "whole shard/chunk file",
              "location": "<array>/checksums/<key with '/' as '.'>.json, one per shard"}
#: arrays whose chunks/shards get a record, written by StoreWriter per (condition, shard) unit
_BLOCK = 8 << 20


def crc32c_update(data, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data`` continuing from ``value`` (0: a fresh checksum); the one CRC of the store."""
    from crc32c import crc32c as _crc  # a gapcache dependency

    return int(_crc(data, value))


def algorithm_for(is_state: bool) -> str:
    """The record algorithm of an array's chunks: CRC-32C for hidden-state shards, SHA-256 otherwise."""
    return ALGORITHM if is_state else CHUNK_ALGORITHM


def digest(data, algorithm: str = ALGORITHM):
    """Checksum of bytes: an int (crc32c) or a hex string (sha256)."""
    import hashlib

    return crc32c_update(data) if algorithm == ALGORITHM else hashlib.sha256(data).hexdigest()


def file_crc32c(path) -> tuple[int, int] | None:
    """(crc32c, nbytes) of a file, streamed; None if it does not exist."""
    return file_digest(path, ALGORITHM)


def file_digest(path, algorithm: str = ALGORITHM):
    """(checksum, nbytes) of a file, streamed; None if it does not exist."""
    import hashlib

    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
    crc, n = 0, 0
    sha = hashlib.sha256() if algorithm == CHUNK_ALGORITHM else None
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            if sha is None:
                crc = crc32c_update(view[:k], crc)
            else:
                sha.update(view[:k])
            n += k
    return (crc if sha is None else sha.hexdigest()), n


def record_name(key: str) -> str:
    return key.replace("/", ".") + ".json"


def record_path(array_dir, key: str) -> Path:
    return Path(array_dir) / DIRNAME / record_name(key)


def make_record(key: str, found, algorithm: str = ALGORITHM) -> dict:
    value, n = found if found is not None else (None, 0)
    return {"key": key, algorithm: value, "nbytes": n}


def record_algorithm(rec: dict) -> str:
    """Which algorithm a record holds (KeyError if none)."""
    return next(a for a in ALGORITHMS if a in rec) if any(a in rec for a in ALGORITHMS) else rec[ALGORITHM]


def write_record(array_dir, key: str, found, algorithm: str = ALGORITHM) -> None:
    """Atomically write the record of ``key`` ((checksum, nbytes), or None for a key holding no data)."""
    path = record_path(array_dir, key)
    path.parent.mkdir(exist_ok=True)
    tmp = path.parent / tmp_name(path.name)
    tmp.write_text(json.dumps(make_record(key, found, algorithm)))
    os.replace(tmp, path)


def record_file(array_dir, key: str, algorithm: str = ALGORITHM) -> None:
    """Checksum the file at ``key`` as it is now and record it."""
    write_record(array_dir, key, file_digest(Path(array_dir).joinpath(*key.split("/")), algorithm), algorithm)
