"""Compression settings on a store's own hidden states: bytes kept and CPU seconds per GB, to encode and decode.

Usage::

    python benchmarks/bench_codecs.py STORE                       # the auto choice and the usual candidates
    python benchmarks/bench_codecs.py STORE --array token_states --chunks 2000 \\
        --settings zstd:1,blosc:lz4:5:shuffle,blosc:lz4:9:bitshuffle

What ``extract.compression: auto`` picks per stored item size (``gapcache.store.codec.AUTO_COMPRESSION``)
comes from this measurement: the store's inner chunks are read back (decoded with its own codec), then each
setting encodes and decodes the same chunks on one thread (numcodecs' blosc told to use no threads of its
own, as in the writer's encode pool). Best of ``--repeats`` for each. The chunks are those of the first
shards, in storage dtype (bf16 states as their uint16 bits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_SETTINGS = ("auto,zstd:1,blosc:lz4:5:shuffle,blosc:lz4:9:bitshuffle,blosc:lz4:9:bitshuffle:32768,"
                    "blosc:blosclz:5:shuffle,blosc:zstd:1:shuffle")


def store_chunks(store: Path, array: str, limit: int) -> tuple[list[np.ndarray], int]:
    """Up to ``limit`` inner chunks of ``array`` (C-contiguous, storage dtype), and its item size."""
    import zarr

    from gapcache.store.shardread import ShardReader

    arr = zarr.open_array(store / array, mode="r")
    reader = ShardReader.open(arr)
    sa = reader.sa
    chunk, shard = sa.chunk_shape, sa.shard_shape
    out: list[np.ndarray] = []
    lead = [range(0, n, s) for n, s in zip(arr.shape, shard)]
    for origin in np.ndindex(*[len(r) for r in lead]):
        start = [r[i] for r, i in zip(lead, origin)]
        block = reader[tuple(slice(a, min(a + s, n)) for a, s, n in zip(start, shard, arr.shape))]
        for idx in np.ndindex(*[-(-b // c) for b, c in zip(block.shape, chunk)]):
            piece = block[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunk))]
            if piece.shape == tuple(chunk):
                out.append(np.ascontiguousarray(piece))
            if len(out) >= limit:
                return out, arr.dtype.itemsize
    return out, arr.dtype.itemsize


def measure(chunks: list[np.ndarray], setting: str, itemsize: int, repeats: int) -> dict:
    """Bytes kept and CPU seconds per GB (best of ``repeats``) of one compression setting over ``chunks``."""
    import numcodecs.blosc

    from gapcache.store import codec
    from gapcache.store.shardio import bytes_codec

    numcodecs.blosc.use_threads = False
    concrete = codec.resolve_compression(setting, itemsize)
    # the numcodecs implementation shardio writes this setting with (from the codec's Zarr v3 metadata)
    impls = [bytes_codec(c.to_dict(), chunks[0].dtype, "bench") for c in codec.state_codecs(concrete, itemsize)]
    impl = impls[0][1] if impls else None
    raw = sum(c.nbytes for c in chunks)
    if impl is None:
        return {"setting": setting, "codec": concrete, "kept": 1.0, "encode_s_per_gb": 0.0, "decode_s_per_gb": 0.0}
    enc_s = dec_s = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        encoded = [impl.encode(c) for c in chunks]
        enc_s = min(enc_s, time.process_time() - t)
        t = time.process_time()
        for e, c in zip(encoded, chunks):
            impl.decode(e)
        dec_s = min(dec_s, time.process_time() - t)
    for e, c in zip(encoded[:8], chunks):  # lossless, or the figures mean nothing
        assert np.array_equal(np.frombuffer(impl.decode(e), dtype=c.dtype).reshape(c.shape), c), setting
    return {"setting": setting, "codec": concrete, "kept": sum(len(e) for e in encoded) / raw,
            "encode_s_per_gb": enc_s / raw * 1e9, "decode_s_per_gb": dec_s / raw * 1e9}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--array", default="visual_states", help="a state array of the store")
    ap.add_argument("--chunks", type=int, default=1000, help="inner chunks measured")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated compression settings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    chunks, itemsize = store_chunks(args.store, args.array, args.chunks)
    if not chunks:
        raise SystemExit(f"{args.store / args.array} has no whole inner chunk to measure.")
    mb = sum(c.nbytes for c in chunks) / 1e6
    print(f"{args.array}: {len(chunks)} inner chunks of {chunks[0].shape} {chunks[0].dtype} ({mb:.1f} MB), "
          f"best of {args.repeats}, one thread")
    print(f"  {'setting':34s} {'codec':30s} {'kept':>6s} {'enc s/GB':>9s} {'dec s/GB':>9s}")
    rows = [measure(chunks, s, itemsize, args.repeats) for s in args.settings.split(",")]
    for r in rows:
        print(f"  {r['setting']:34s} {r['codec']:30s} {r['kept']:6.3f} {r['encode_s_per_gb']:9.2f} "
              f"{r['decode_s_per_gb']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
