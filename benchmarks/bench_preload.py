"""The analysis' first read of a store's small arrays (``preload_small``: status, scores, labels, offsets, the
per-sample strings) with gapcache's direct chunk reader against zarr-python, side by side on the same store.

Usage::

    python benchmarks/bench_preload.py [--samples 10000] [--repeats 3] [--workdir DIR]
    python benchmarks/bench_preload.py --store run/store.zarr      # an existing store

A store's per-sample arrays have a chunk per shard and its per-unit arrays a chunk per (condition, shard): a
10,000-sample store of five conditions at 32 samples a shard holds ~7,200 such chunks. Without ``--store`` a
synthetic store of ``--samples`` samples is written first (``bench_analysis_memory.write_store``: conditions
original + four truncations, hidden 32, four layers; ~20 s at 10,000). Reported: chunks and MB preloaded,
best-of-``--repeats`` seconds of each reader (alternating, the page cache warm after the first), their ratio,
and whether every preloaded variable is identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


@contextmanager
def through_zarr():
    """open_store's variables read by zarr-python chunk by chunk (gapcache before its direct chunk reader)."""
    from gapcache.store import reader

    saved = reader._direct_reader, reader.read_whole
    reader._direct_reader = lambda arr: saved[0](arr) if arr.shards is not None else None
    reader.read_whole = lambda data: None
    try:
        yield
    finally:
        reader._direct_reader, reader.read_whole = saved


def preload(path):
    from gapcache.analyze.pipeline import preload_small
    from gapcache.store import open_store

    ds = open_store(path)
    t = time.perf_counter()
    pre = preload_small(ds)
    seconds = time.perf_counter() - t
    small = [k for k in pre.variables if k in ds.variables and pre[k].data is not ds[k].data]
    return seconds, {k: pre[k].values for k in small}, ds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="an existing store (default: write a synthetic one)")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    path = args.store
    if path is None:
        from bench_analysis_memory import write_store

        path = (args.workdir or Path(tempfile.mkdtemp(prefix="gapcache-preload-"))) / "store.zarr"
        if not (path / "zarr.json").is_file():
            t = time.perf_counter()
            write_store(path, args.samples, hidden=32, layers=4, tokens=16, spc=32)
            print(f"wrote {path} ({args.samples} samples) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    best = {"direct": float("inf"), "zarr": float("inf")}
    values = {}
    for _ in range(args.repeats):
        for name in best:
            with through_zarr() if name == "zarr" else nullcontext():
                seconds, values[name], ds = preload(path)
            best[name] = min(best[name], seconds)
    chunks = sum(int(np.prod([-(-n // c) for n, c in zip(ds[k].shape, ds[k].encoding.get("chunks", ds[k].shape))]))
                 for k in values["direct"])
    mb = sum(v.nbytes for v in values["direct"].values()) / 1e6
    same = values["direct"].keys() == values["zarr"].keys() and all(
        np.array_equal(v, values["zarr"][k], equal_nan=v.dtype.kind == "f") for k, v in values["direct"].items())
    print(f"store {path}: {len(values['direct'])} variables preloaded, {chunks} chunks, {mb:.1f} MB; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"  direct chunk reader {best['direct']:7.2f} s   zarr-python {best['zarr']:7.2f} s   "
          f"ratio {best['zarr'] / best['direct']:.1f}x   identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
