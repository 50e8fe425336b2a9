"""The one error hierarchy of gapcache (zarr-python style: typed, in one place).

Every message names the thing, says what was expected and what was found, and where it can,
suggests the fix.  Template (scikit-learn style)::

    The 'x' parameter of f must be <expected>. Got <found> instead.
"""

from __future__ import annotations


class GapcacheError(Exception):
    """Base class of every error gapcache raises on purpose."""


class ConfigError(GapcacheError, ValueError):
    """A config value is missing, of the wrong type or out of range."""


class UnknownNameError(GapcacheError, KeyError):
    """A name (model family, condition, dataset, metric) is not in its registry."""

    def __init__(self, kind: str, name: str, known):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"Unknown {kind} {name!r}. Supported {kind}s: {', '.join(self.known)}.")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class DataError(GapcacheError):
    """A dataset or a manifest cannot be read."""


class SampleError(GapcacheError):
    """One sample cannot be processed (missing/corrupt image, empty question, bad sites).

    Extraction records it as failed with this message and goes on.
    """

    def __init__(self, sample_id: str, reason: str):
        self.sample_id, self.reason = sample_id, reason
        super().__init__(f"sample {sample_id!r}: {reason}")


class SiteError(SampleError):
    """A token site (visual span, instruction, prediction) is missing or inconsistent."""


class StoreError(GapcacheError):
    """A store is missing, malformed or cannot be written."""


class SchemaVersionError(StoreError):
    """A store was written with a schema version this gapcache cannot read."""


class IncompatibleStoreError(StoreError):
    """Two stores (or a store and a config) disagree on a field that must match."""


class StoreLockedError(StoreError):
    """Another process holds the writer lock of this store (or of this shard)."""


class StoreFrozenError(StoreError):
    """The store was frozen read-only by ``gapcache freeze``; no writer may change it."""


class UnsupportedShardFormat(StoreError):
    """The array's metadata asks for something the direct shard writer does not implement."""


class DamagedChunkError(StoreError):
    """A chunk of a store array does not decode (checksum mismatch, broken frame): the bytes are damaged."""


class SlurmError(GapcacheError):
    """sbatch/scontrol failed, or a submission would collide with running jobs."""


class PluginError(GapcacheError):
    """A registry entry (gapcache.plugins) cannot be loaded: a broken plugin, or an entry naming a missing object."""


class StopForward(Exception):
    """Control flow, not an error: raised by a forward pre-hook once it holds the states it needs, so the rest of
    the model is not run (swap's partial donor forward, ``Extraction.donor_states``); caught by its caller."""


class DirectIORefused(Exception):
    """Control flow, not an error: the filesystem refused O_DIRECT (EINVAL); the shard is written buffered
    (``gapcache.store.shardio``)."""
