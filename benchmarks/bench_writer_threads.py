"""Writer throughput per CPU thread: how many writer threads a GPU node needs (docs/gpu-throughput.md).

Usage::

    python benchmarks/bench_writer_threads.py [--mb 512] [--threads 1] [--json out.json]

Qwen3-VL-30B-A3B-shaped shard payloads of bf16 bits (``bench_extract.py``'s ``_payloads``: hidden 2048,
49 layers, 64 visual tokens a sample, 32 samples a shard) go through a ``StoreWriter`` with the store's
default settings and ``--threads`` encode threads. Process CPU seconds are measured around the whole write
(every thread of the writer, while the main thread only waits), so bytes / CPU second is the rate one
fully busy core sustains, whatever else runs on the machine; the wall rate is printed beside it. A raw
``os.write`` + ``fsync`` of the same bytes gives the kernel's own CPU cost per byte.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=512, help="payload to write (MB)")
    ap.add_argument("--threads", type=int, default=1, help="encode threads of the writer")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_extract as be

    import numpy as np

    from gapcache.conditions import Condition
    from gapcache.store import Layout, StoreWriter, create

    args = argparse.Namespace(  # bench_extract's I/O-bound defaults
        io_samples_per_shard=32, io_layers=49, io_hidden=2048, io_vtokens=64, io_mb=a.mb, seed=0)
    pays, n_shards = be._payloads(args)
    nbytes = sum(p.text_states.nbytes + p.visual_states.nbytes for p in pays)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gapcache-wthreads-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        n = n_shards * 32
        layout = Layout(sample_ids=tuple(f"s{i:06d}" for i in range(n)), conditions=(Condition("original"),),
                        layers=tuple(range(49)), hidden=2048, model_dtype="bfloat16", candidates=("yes", "no"),
                        visual_lengths=(64,) * n, samples_per_shard=32, visual_chunk_tokens=64)
        path = work / "store.zarr"
        create(path, layout, {"bench": True}, {"label": np.zeros(n, np.int32)})
        os.sync()
        load0 = os.getloadavg()
        t, c = time.perf_counter(), time.process_time()
        with StoreWriter(path, threads=a.threads) as w:
            for p in pays:
                w.submit(p)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        stored = w.bytes_stored
        shutil.rmtree(path)
        os.sync()
        raw = work / "raw.bin"
        t, c = time.perf_counter(), time.process_time()
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for p in pays:
            for arr in (p.text_states, p.visual_states):
                os.write(fd, np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        os.fsync(fd)
        os.close(fd)
        raw_wall, raw_cpu = time.perf_counter() - t, time.process_time() - c
        raw.unlink()
        load1 = os.getloadavg()
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res = {"payload_bytes": nbytes, "stored_bytes": stored, "threads": a.threads, "wall_s": wall, "cpu_s": cpu,
           "mb_per_cpu_s": nbytes / cpu / MB, "wall_mb_s": nbytes / wall / MB,
           "raw_wall_mb_s": nbytes / raw_wall / MB, "raw_mb_per_cpu_s": nbytes / raw_cpu / MB,
           "loadavg": [load0, load1]}
    print(f"writer, default store settings, {a.threads} encode thread(s): {nbytes / MB:.0f} MB of bf16 in "
          f"{n_shards} shards -> {stored / MB:.0f} MB stored ({stored / nbytes:.3f}); {cpu:.2f} CPU s, {wall:.2f} s "
          f"wall: {res['mb_per_cpu_s']:.0f} MB per CPU second (per busy thread), {res['wall_mb_s']:.0f} MB/s wall")
    print(f"raw os.write + fsync: {raw_cpu:.2f} CPU s, {raw_wall:.2f} s wall: {res['raw_mb_per_cpu_s']:.0f} MB per "
          f"CPU second, {res['raw_wall_mb_s']:.0f} MB/s wall")
    print(f"load {tuple(round(x, 2) for x in load0)} -> {tuple(round(x, 2) for x in load1)}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
