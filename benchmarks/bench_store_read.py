"""Store read selectivity and concurrent-writer throughput.

Usage::

    python benchmarks/bench_store_read.py [--samples 256] [--layers 17] [--hidden 512] [--vtokens 16]
                                          [--writers 8] [--workdir DIR] [--json out.json]

1. **Selectivity**: a synthetic bf16 store (conditions original, blind_black, truncated_zero_L1;
   random states, so zstd barely compresses them: a worst case for the fraction) is read through
   a zarr ``LocalStore`` subclass that counts every byte handed to zarr (whole keys and byte
   ranges). One layer of one text site across all samples of one condition, the typical probe
   input, is loaded with ``open_store(...).text_states.sel(...)``; reported: bytes read, the
   store's size on disk, their ratio, and the ratio the chunk geometry predicts (one inner chunk
   (1, samples_per_shard, 1, 1, hidden) per shard, plus the shard indexes and the metadata).
2. **Writers**: the same payloads written by one process (all (condition, shard) units) and by
   ``--writers`` processes each writing units ``i::writers`` of one store at once (as Slurm array
   tasks do), each process timed from a shared start barrier (payloads built before it) to its
   ``close()``; MB/s of hidden-state payload and the ratio. On a machine with fewer cores than
   writers the ratio is bounded by the cores (encoding is CPU work).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def layout_for(a):
    from gapcache.conditions import expand
    from gapcache.store import Layout

    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, a.vtokens // 2), a.vtokens * 3 // 2 + 1, a.samples)
    return Layout(sample_ids=tuple(f"s{i:05d}" for i in range(a.samples)),
                  conditions=tuple(expand(["original", "blind_black", "truncated"], [1], ["zero"])),
                  layers=tuple(range(a.layers)), hidden=a.hidden, model_dtype="bfloat16", candidates=("no", "yes"),
                  visual_lengths=tuple(int(x) for x in lengths), samples_per_shard=32, visual_chunk_tokens=64)


def _payloads(layout, units=None):
    from helpers import random_payloads

    ps = random_payloads(layout, seed=1)
    return ps if units is None else [p for p in ps if (p.condition, p.shard) in units]


def _create(path, layout):
    from gapcache.store import create

    create(path, layout, {"model": {"id": "bench"}}, {"question": np.array(["q"] * layout.n_samples, dtype=object)})


def _writer(path, layout_args, task, n_tasks, barrier, q):
    layout = layout_for(layout_args)
    from gapcache.store import StoreWriter

    units = [(ci, s) for ci in range(len(layout.conditions)) for s in range(layout.n_shards)][task::n_tasks]
    ps = _payloads(layout, set(units))
    nbytes = sum(p.text_states.nbytes + (0 if p.visual_states is None else p.visual_states.nbytes) for p in ps)
    barrier.wait()
    t0 = time.time()
    with StoreWriter(path, threads=max(1, (os.cpu_count() or 1) // n_tasks)) as w:
        for p in ps:
            w.submit(p)
    q.put((t0, time.time(), nbytes))


def write_throughput(path, a, n_tasks) -> dict:
    layout = layout_for(a)
    shutil.rmtree(path, ignore_errors=True)
    _create(path, layout)
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(n_tasks), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(path), a, i, n_tasks, barrier, q)) for i in range(n_tasks)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    t0, t1, nbytes = min(r[0] for r in res), max(r[1] for r in res), sum(r[2] for r in res)
    return {"writers": n_tasks, "seconds": round(t1 - t0, 3), "payload_mb": round(nbytes / 1e6, 1),
            "mb_per_s": round(nbytes / 1e6 / (t1 - t0), 1)}


def selectivity(path, a) -> dict:
    import xarray as xr
    from zarr.storage import LocalStore

    from gapcache.store import codec
    from gapcache.store.reader import size_on_disk

    class Counting(LocalStore):
        nbytes = 0
        nreads = 0

        async def get(self, key, prototype=None, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is not None:
                Counting.nbytes += len(buf)
                Counting.nreads += 1
            return buf

        async def get_partial_values(self, prototype, key_ranges):
            out = await super().get_partial_values(prototype, key_ranges)
            for buf in out:
                if buf is not None:
                    Counting.nbytes += len(buf)
                    Counting.nreads += 1
            return out

    store = Counting(str(path), read_only=True)
    ds = xr.open_zarr(store, consolidated=False, chunks={}, zarr_format=3)
    meta_bytes = Counting.nbytes
    Counting.nbytes = Counting.nreads = 0
    layer = a.layers // 2
    t0 = time.perf_counter()
    raw = ds.text_states.sel(condition="original", site="prediction", layer=layer).values
    values = codec.decode(raw, "bfloat16")
    dt = time.perf_counter() - t0
    total = size_on_disk(path)
    g = ds.text_states.encoding  # chunk and shard shapes, reported
    n_shards = -(-a.samples // 32)
    chunk_payload = 32 * a.hidden * 2
    return {"selection": f"text_states[condition=original, site=prediction, layer={layer}] over {a.samples} samples",
            "values_shape": list(values.shape), "store_bytes": total, "bytes_read": Counting.nbytes,
            "reads": Counting.nreads, "fraction_of_store": round(Counting.nbytes / total, 5),
            "geometry_fraction (payload only)": round(n_shards * chunk_payload / total, 5),
            "metadata_bytes_at_open": meta_bytes, "seconds": round(dt, 3), "chunks": g.get("chunks"),
            "shards": g.get("shards")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--layers", type=int, default=17)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vtokens", type=int, default=16, help="mean visual tokens per sample")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--workdir")
    p.add_argument("--json")
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gapcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"params": vars(a), "cpus": len(os.sched_getaffinity(0))}
    one = write_throughput(work / "one.zarr", a, 1)
    many = write_throughput(work / "many.zarr", a, a.writers)
    out["write"] = {"one": one, "many": many, "ratio_many_over_one": round(many["mb_per_s"] / one["mb_per_s"], 2)}
    import zarr

    ga, gb = zarr.open_group(work / "one.zarr", mode="r"), zarr.open_group(work / "many.zarr", mode="r")
    out["write"]["stores_equal"] = all(np.array_equal(ga[n][...], gb[n][...], equal_nan=ga[n].dtype.kind == "f")
                                       for n, _ in ga.arrays())
    out["read"] = selectivity(work / "one.zarr", a)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
