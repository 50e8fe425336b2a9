"""How hidden states are encoded on disk, and decoded back.

Zarr v3 has no native bfloat16, and LLM residual streams hold "massive activations" far above
float16's 65504, so a bf16 model must not be stored as float16. gapcache stores a bf16 state as
its raw 16 bits in a ``uint16`` array with the attribute ``gapcache_encoding = "bfloat16"``:

    raw   = bits of the bfloat16 value                      # uint16, exact, 2 bytes a value
    value = (raw.astype(uint32) << 16).view(float32)          # exact: bf16 is the top half of f32

Any Zarr v3 reader gets the uint16 array; the one line above decodes it (``decode``).
float16 and float32 models are stored in their own dtype with ``gapcache_encoding = "none"``.

The codec chain is portable (core Zarr v3 codecs only): inner chunks ``bytes -> zstd(level)``
inside a ``sharding_indexed`` codec whose index is protected by ``crc32c``.
"""

from __future__ import annotations

import numpy as np

from gapcache.errors import ConfigError, StoreError

ENCODING_ATTR = "gapcache_encoding"

#: model dtype name -> (on-disk numpy dtype, encoding label)
STORAGE = {
    "bfloat16": (np.dtype("uint16"), "bfloat16"),
    "float16": (np.dtype("float16"), "none"),
    "float32": (np.dtype("float32"), "none"),
}


def storage_for(model_dtype: str) -> tuple[np.dtype, str]:
    """On-disk dtype and encoding label for a model dtype name ('bfloat16', 'float16', 'float32')."""
    try:
        return STORAGE[model_dtype]
    except KeyError:
        raise ConfigError(
            f"The 'dtype' of the model must be one of {sorted(STORAGE)}. Got {model_dtype!r} instead."
        ) from None


def encode_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, NaN kept as a quiet NaN."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def decode_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def decode(raw, encoding: str):
    """Decode an on-disk array (numpy or dask) given its ``gapcache_encoding`` attribute."""
    if encoding == "none":
        return raw
    if encoding == "bfloat16":
        if hasattr(raw, "map_blocks"):  # dask: stay lazy
            return raw.map_blocks(decode_bf16, dtype=np.float32)
        return decode_bf16(raw)
    raise StoreError(
        f"Unknown {ENCODING_ATTR} {encoding!r}; this gapcache reads 'bfloat16' and 'none'. "
        "Upgrade gapcache to read this store."
    )


def state_codecs(level: int = 1):
    """Compressors for hidden-state arrays: zstd at ``level``, or none for level 0.

    zstd 1 stores bf16 states at ~0.78 of their size but costs ~3 CPU-seconds per GB; on a node
    with few cores and a fast disk, level 0 (no compression, 2 bytes a bf16 value) writes faster.
    Sharding and its crc32c-protected index are zarr's default around these.
    """
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=level)] if level > 0 else []
