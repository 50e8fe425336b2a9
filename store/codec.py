"""How hidden states are encoded on disk, and decoded back.

Zarr v3 has no native bfloat16, and LLM residual streams hold "massive activations" far above
float16's 65504, so a bf16 model must not be stored as float16. gapcache stores a bf16 state as
its raw 16 bits in a ``uint16`` array with the attribute ``gapcache_encoding = "bfloat16"``:

    raw   = bits of the bfloat16 value                      # uint16, exact, 2 bytes a value
    value = (raw.astype(uint32) << 16).view(float32)          # exact: bf16 is the top half of f32

Any Zarr v3 reader gets the uint16 array; the one line above decodes it (``decode``).
float16 and float32 models are stored in their own dtype with ``gapcache_encoding = "none"``.

The codec chain is portable (Zarr v3 codecs every implementation reads): inner chunks
``bytes -> <compression>`` inside a ``sharding_indexed`` codec whose index is protected by
``crc32c``. The compression is a setting (:func:`parse_compression`): ``auto`` by default (what the
stored item size compresses best per CPU second: :data:`AUTO_COMPRESSION`), ``none``, a zstd level, or
``blosc`` (byte or bit shuffle over the stored items) with lz4, zstd, blosclz, lz4hc or zlib inside; the
store records the concrete codec (each array's metadata), never ``auto``. Every shard's bytes are covered
by its CRC-32C record.
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


#: the compression of hidden-state arrays a store gets unless the config says otherwise
DEFAULT_COMPRESSION = "auto"
#: what ``auto`` means for each stored item size (bytes). Measured on one core, 128 KB inner chunks of the
#: bench model's states (``benchmarks/bench_codecs.py STORE`` on a store ``bench_extract.py --keep`` leaves;
#: ``benchmarks/bench_writer.py`` for bf16):
#: 2-byte items (bf16 bits, float16): ``zstd:1`` 1.57 bytes a value, ~1 CPU-s per GB to encode.
#: float32: ``zstd:1`` keeps 0.924 of the bytes at 0.96 s/GB to encode, 0.82 to decode;
#: ``blosc:lz4:5:shuffle`` keeps 0.807 at 0.45 s/GB to encode, 0.26 to decode (bitshuffle: 0.795, 0.72 / 0.52;
#: blosclz: 0.804, 0.84 / 0.35), so float32 states get it: fewer bytes for half the writer's CPU.
AUTO_COMPRESSION = {2: "zstd:1", 4: "blosc:lz4:5:shuffle"}
BLOSC_CNAMES = ("lz4", "lz4hc", "blosclz", "zstd", "zlib")
BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
COMPRESSION_FORMS = ("auto", "none", "zstd:<level 1..22>", "blosc:<cname>:<clevel 1..9>:<shuffle>[:<blocksize bytes>]")


def parse_compression(spec) -> tuple:
    """A compression setting -> its parts: ``("auto",)``, ``("none",)``, ``("zstd", level)`` or
    ``("blosc", cname, clevel, shuffle, blocksize)``.

    Forms (:data:`COMPRESSION_FORMS`): ``"auto"`` (:func:`resolve_compression` makes it concrete); ``"none"``;
    ``"zstd:1"``; ``"blosc:lz4:5:bitshuffle"`` (blosc
    with ``cname`` in :data:`BLOSC_CNAMES`, ``shuffle`` in :data:`BLOSC_SHUFFLES`, byte or bit shuffle
    over the stored dtype's items, an optional blocksize in bytes, 0 = blosc's choice). An int is the
    old ``compression_level``: 0 = ``"none"``, n = ``"zstd:n"``. Raises ValueError on anything else.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return ("none",) if spec == 0 else _zstd_parts(spec)
    parts = str(spec).split(":") if isinstance(spec, str) else []
    if parts in (["none"], ["auto"]):
        return (parts[0],)
    if len(parts) == 2 and parts[0] == "zstd" and _is_digits(parts[1]):
        return _zstd_parts(int(parts[1]))
    if len(parts) in (4, 5) and parts[0] == "blosc" and _is_digits(*parts[2:3], *parts[4:]):
        cname, clevel, shuffle = parts[1], int(parts[2]), parts[3]
        blocksize = int(parts[4]) if len(parts) == 5 else 0
        if cname in BLOSC_CNAMES and 1 <= clevel <= 9 and shuffle in BLOSC_SHUFFLES:
            return ("blosc", cname, clevel, shuffle, blocksize)
    raise ValueError(f"{spec!r} is not a compression setting; expected one of {list(COMPRESSION_FORMS)} "
                     f"(blosc cname in {list(BLOSC_CNAMES)}, shuffle in {list(BLOSC_SHUFFLES)}).")


def _is_digits(*texts: str) -> bool:
    return all(t.isdigit() for t in texts)


def _zstd_parts(level: int) -> tuple:
    if not 1 <= level <= 22:
        raise ValueError(f"A zstd level must be in [1, 22]. Got {level} instead.")
    return ("zstd", level)


def resolve_compression(spec, typesize: int) -> str:
    """A compression setting (:func:`parse_compression`) -> the concrete one (never ``auto``) for stored items
    of ``typesize`` bytes: ``auto`` -> :data:`AUTO_COMPRESSION`; an int (the old zstd level) -> ``"none"`` or
    ``"zstd:<level>"``; any other setting as given."""
    parts = parse_compression(spec)
    if parts[0] == "auto":
        return AUTO_COMPRESSION.get(int(typesize), AUTO_COMPRESSION[2])
    if isinstance(spec, int):
        return "none" if parts[0] == "none" else f"zstd:{parts[1]}"
    return spec


def state_codecs(compression=DEFAULT_COMPRESSION, typesize: int = 2):
    """Compressors (Zarr v3 core codecs) for hidden-state arrays of ``typesize``-byte items from a compression
    setting (:func:`parse_compression`; ``auto`` resolved by :func:`resolve_compression`; an int is the old
    zstd level, 0 = none).

    Measured on bf16 states (one core, 256 KB inner chunks; ``benchmarks/bench_writer.py`` end to end):
    ``zstd:1`` 1.57 bytes a value (1.68 with channel scales spread lognormal(0, 2)), ~1 CPU-s per GB to
    encode, ~1.3 to decode; ``blosc:lz4:9:bitshuffle:32768`` 1.64 (1.74), ~0.45 s/GB to encode, ~0.35 to
    decode; ``blosc:zstd:1:shuffle:262144`` 1.39 (1.48), ~2 s/GB to encode; ``none`` 2 bytes a value.
    Sharding and its crc32c-protected index are zarr's default around these.
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    parts = parse_compression(resolve_compression(compression, typesize))
    if parts[0] == "none":
        return []
    if parts[0] == "zstd":
        return [ZstdCodec(level=parts[1])]
    _, cname, clevel, shuffle, blocksize = parts
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=typesize, blocksize=blocksize)]


def compression_of(codecs: list) -> str:
    """The compression setting of an array's inner codec list (JSON dicts of its ``sharding_indexed``
    codec): the inverse of :func:`state_codecs`, for merging stores."""
    for c in codecs or ():
        name, cfg = (c, {}) if isinstance(c, str) else (c.get("name"), c.get("configuration") or {})
        if name == "zstd":
            return f"zstd:{int(cfg.get('level', 0))}"
        if name == "blosc":
            spec = f"blosc:{cfg['cname']}:{int(cfg['clevel'])}:{cfg['shuffle']}"
            return spec + (f":{int(cfg['blocksize'])}" if cfg.get("blocksize") else "")
    return "none"


def array_compression(arr) -> str:
    """The compression setting of a zarr state array (its ``sharding_indexed`` inner codecs), e.g. for merging
    stores or showing a store (``gapcache info``)."""
    return compression_of(arr.metadata.to_dict()["codecs"][0].get("configuration", {}).get("codecs"))
