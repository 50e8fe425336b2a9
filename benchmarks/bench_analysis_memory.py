"""Analysis of a store several times larger than the memory it may use completes (lazy Dask).

Usage::

    python benchmarks/bench_analysis_memory.py --store-gb 6 --cap-gb 2 [--workdir /tmp] [--keep]

Writes a synthetic bf16 store (random states, labels with a planted signal) through gapcache's
own writer, then runs `effective rank` (visual spans and text sites) and `probes` on it in a child
process whose address space is capped with RLIMIT_AS (MALLOC_ARENA_MAX=2 so glibc's per-thread
arenas do not eat the cap). Prints the store size, the cap, the child's peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from gapcache.analyze.pipeline import AnalysisParams, analyze_store
from gapcache.analyze.scheduler import scheduler
from gapcache.store import open_store
cap = int(sys.argv[2])
if cap > 0:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
t0 = time.perf_counter()
with scheduler("threads"):
    summary, _ = analyze_store(open_store(sys.argv[1]), AnalysisParams(metrics=("rank", "probes"), n_resamples=199))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
status = open("/proc/self/status").read()
vm_peak = int(status.split("VmPeak:")[1].split()[0]) * 1024
task = next(iter(summary["metrics"]["probes"]))
acc = summary["metrics"]["probes"][task]["original"]["prediction"]["accuracy"]
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak, "vm_peak": vm_peak, "probe_accuracy": acc,
                  "timing_s": summary["timing_s"]}))
"""


def build_store(path: Path, gb: float, hidden: int, layers: int, tokens: int, spc: int, seed: int = 0) -> int:
    from gapcache.conditions import expand
    from gapcache.store import Layout, ShardPayload, StoreWriter, codec, create

    per_sample = (tokens + 2) * layers * hidden * 2
    n = max(2 * spc, int(gb * 1e9 / per_sample) // spc * spc)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    layout = Layout(sample_ids=tuple(f"s{i:06d}" for i in range(n)), conditions=tuple(expand(["original"])),
                    layers=tuple(range(layers)), hidden=hidden, model_dtype="bfloat16", candidates=("no", "yes"),
                    visual_lengths=(tokens,) * n, samples_per_shard=spc, visual_chunk_tokens=64)
    meta = {"label": labels.astype(np.int32), "answer": np.array(["no", "yes"], dtype=object)[labels],
            "category": np.array(["hard"] * n, dtype=object), "candidate_mask": np.ones((n, 2), bool)}
    create(path, layout, {"model": {"id": "synthetic"}}, meta)
    direction = rng.standard_normal(hidden).astype(np.float32)
    with StoreWriter(path) as w:
        for shard in range(layout.n_shards):
            idx = np.arange(shard * spc, min(n, (shard + 1) * spc))
            text = rng.standard_normal((len(idx), 2, layers, hidden), dtype=np.float32)
            text[:, :, layers // 2 :] += (labels[idx] * 2 - 1)[:, None, None, None] * direction  # planted signal
            vis = rng.standard_normal((len(idx) * tokens, layers, hidden), dtype=np.float32)
            w.submit(ShardPayload(0, shard, dict(
                text_states=codec.encode_bf16(text), visual_states=codec.encode_bf16(vis),
                gold_logprob=np.zeros(len(idx), np.float32), candidate_logprob=np.zeros((len(idx), 2), np.float32),
                status=np.ones(len(idx), np.uint8), error=np.array([""] * len(idx), dtype=object))))
            print(f"\rwriting shard {shard + 1}/{layout.n_shards}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store-gb", type=float, default=6.0)
    ap.add_argument("--cap-gb", type=float, default=2.0, help="address-space cap of the analysis; 0 = none")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--store", help="reuse a store written by an earlier --keep run")
    args = ap.parse_args()
    from gapcache.store.reader import size_on_disk

    tmp = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        path = Path(args.store) if args.store else tmp / "big.zarr"
        t0 = time.perf_counter()
        if not args.store:
            n = build_store(path, args.store_gb, args.hidden, args.layers, args.tokens, args.samples_per_shard)
            print(f"store: {n} samples, written in {time.perf_counter() - t0:.0f} s at {path}")
        size = size_on_disk(path)
        print(f"store: {size / 1e9:.2f} GB on disk")
        cap = int(args.cap_gb * 1e9)
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(cap)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:])
            print(f"FAILED under a {args.cap_gb} GB cap (exit {r.returncode})")
            sys.exit(1)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"analysis (rank + probes) under RLIMIT_AS={args.cap_gb:.1f} GB (0 = none): completed in "
              f"{res['seconds']:.0f} s, peak RSS {res['peak_rss'] / 1e9:.2f} GB = {res['peak_rss'] / size:.2f} x the "
              f"store size, peak virtual {res['vm_peak'] / 1e9:.2f} GB; "
              f"timing {res['timing_s']}")
        print(f"probe accuracy by layer (signal planted from layer {args.layers // 2}): "
              f"{[round(a, 2) for a in res['probe_accuracy']]}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
