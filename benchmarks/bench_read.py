"""Reading a store's hidden states: straight from the shard files (``store/shardread.py``) against zarr-python,
side by side on the same store, the same selections (one layer of one shard per read, as the analysis reads).

Usage::

    python benchmarks/bench_read.py STORE [--arrays token_states visual_states text_states] [--repeats 3]

    gapcache demo --out /tmp/demo && python benchmarks/bench_read.py /tmp/demo/store.zarr

Per array: MB decoded, best-of-``--repeats`` seconds of each reader over every (condition, shard, layer) block,
their ratio, and whether every block is bit-identical. The second reader runs on a warm page cache either way
(the first repeat of the first reader warms it; best-of takes that out).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np


def blocks(arr):
    """Every (1 condition, whole shard rows, 1 layer along the layer axis, rest whole) selection of a state array."""
    shards = arr.shards or arr.chunks  # (condition, rows[, site], layer, hidden): rows and hidden by shard
    ranges = [[slice(i, min(i + s, n)) for i in range(0, n, s)] if axis in (1, arr.ndim - 1)
              else [slice(i, i + 1) for i in range(n)] for axis, (n, s) in enumerate(zip(arr.shape, shards))]
    return list(itertools.product(*ranges))


def timed(read, keys, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        got = [read(k) for k in keys]
        best = min(best, time.perf_counter() - t)
        out = got
    return best, out


def main():
    import zarr

    from gapcache.store.shardread import ShardReader

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--arrays", nargs="+", default=["token_states", "visual_states", "text_states"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"store {args.store}, load {os.getloadavg()[0]:.2f}")
    for name in args.arrays:
        try:
            arr = zarr.open_array(os.path.join(args.store, name), mode="r")
        except FileNotFoundError:
            print(f"{name:14s} not in the store")
            continue
        direct = ShardReader.open(arr)
        keys = blocks(arr)
        t_direct, a = timed(direct.__getitem__, keys, args.repeats)
        t_zarr, b = timed(arr.__getitem__, keys, args.repeats)
        same = all(np.array_equal(x, y) for x, y in zip(a, b))
        mb = sum(x.nbytes for x in a) / 1e6
        print(f"{name:14s} {len(keys):5d} reads {mb:8.1f} MB  direct {t_direct:6.2f} s  zarr {t_zarr:6.2f} s  "
              f"zarr/direct {t_zarr / t_direct:5.1f}x  identical {same}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
