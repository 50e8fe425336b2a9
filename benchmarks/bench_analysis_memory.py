"""Analysis memory is flat in store size: `gapcache analyze` (evd + rank + probes) on a small and a 4x larger store.

Usage::

    python benchmarks/bench_analysis_memory.py [--sizes-gb 2 8] [--workdir /tmp] [--keep] [--trace]
    python benchmarks/bench_analysis_memory.py --store A.zarr --store B.zarr   # stores of an earlier --keep run

For each size, writes a synthetic bf16 store of about that many bytes on disk through gapcache's own
writer (``create`` + ``StoreWriter``: a real store, ``original`` plus truncated conditions so that evd
runs; visual spans of random states; text states with a label direction planted from the middle layer;
gold log-probs whose Delta falls at a planted cliff for "hard" samples), then runs the real CLI,
``gapcache analyze STORE --out OUT --metrics evd,rank,probes``, in a child process, whose peak resident set
is its own ``VmHWM`` (``/proc/self/status``) read as its last act (no address-space cap, which would count
every thread's stack reservation). Not ``ru_maxrss`` of ``wait4``/``RUSAGE_CHILDREN``: Linux carries the
forking parent's high-water mark into the child's ``maxrss`` at exec (measured: this script's parent, which
generated an 8 GB store, showed its own 1.40 GB peak as the child's for both stores). Each metric's compute is
wrapped to record VmRSS before it and VmHWM after it, so the report says which metric sets the peak; ``--trace`` adds each metric's tracemalloc peak (Python and numpy
allocations; slower). Prints both peaks, their ratio (target <= 1.2), and the larger store's peak
(target < 2 GB). Stores are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: runs in the child: gapcache's CLI, each metric's compute wrapped to record its memory
CHILD = r"""
import json, sys, time, tracemalloc
from gapcache.analyze import metrics as registry
import gapcache.analyze.pipeline  # registers the built-in metrics
from gapcache.cli import main

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

trace = sys.argv[3] == "1"
records = {}
def wrap(entry):
    def compute(ds, p, ctx):
        rss0, t0 = status("VmRSS"), time.perf_counter()
        if trace:
            tracemalloc.reset_peak()
        out = entry.compute(ds, p, ctx)
        records[entry.name] = {"rss_before": rss0, "hwm_after": status("VmHWM"), "seconds": time.perf_counter() - t0,
                               **({"traced_peak": tracemalloc.get_traced_memory()[1]} if trace else {})}
        return out
    return compute
for name, entry in list(registry.REGISTRY.items()):
    registry.REGISTRY[name] = registry.Metric(entry.name, wrap(entry), entry.figure, entry.rows, entry.description)
if trace:
    tracemalloc.start()
rc = main(["analyze", sys.argv[1], "--out", sys.argv[2], "--metrics", "evd,rank,probes", *sys.argv[4:]])
print("RECORDS " + json.dumps({"metrics": records, "vm_hwm": status("VmHWM")}))
sys.exit(rc)
"""

TRUNCATION_LAYERS = (-1, 2, 4, 6, 8)


def _layout(n: int, hidden: int, layers: int, tokens: int, spc: int):
    from gapcache.conditions import expand
    from gapcache.store import Layout

    trunc = [t for t in TRUNCATION_LAYERS if t < layers]
    conds = tuple(expand(["original", "truncated"], trunc, ["zero"]))
    return Layout(sample_ids=tuple(f"s{i:06d}" for i in range(n)), conditions=conds, layers=tuple(range(layers)),
                  hidden=hidden, model_dtype="bfloat16", candidates=("no", "yes"), visual_lengths=(tokens,) * n,
                  samples_per_shard=spc, visual_chunk_tokens=64)


def write_store(path: Path, n: int, hidden: int, layers: int, tokens: int, spc: int, seed: int = 0) -> int:
    """A synthetic store of ``n`` samples written through gapcache's writer; returns its bytes on disk."""
    from gapcache.store import ShardPayload, StoreWriter, codec, create
    from gapcache.store.reader import size_on_disk

    layout = _layout(n, hidden, layers, tokens, spc)
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) // 2) % 2  # balanced within each category
    hard = np.arange(n) % 2 == 0
    meta = {"label": labels.astype(np.int32), "answer": np.array(["no", "yes"], dtype=object)[labels],
            "category": np.where(hard, "hard", "easy").astype(object), "candidate_mask": np.ones((n, 2), bool)}
    create(path, layout, {"model": {"id": "synthetic"}}, meta)
    direction = rng.standard_normal(hidden).astype(np.float32)
    clean = rng.standard_normal(n).astype(np.float32)
    cliff = layers // 2
    with StoreWriter(path) as w:
        for shard in range(layout.n_shards):
            idx = np.arange(shard * spc, min(n, (shard + 1) * spc))
            for k, cond in enumerate(layout.conditions):
                text = rng.standard_normal((len(idx), 2, layers, hidden), dtype=np.float32)
                text[:, :, cliff:] += (labels[idx] * 2 - 1)[:, None, None, None] * direction  # planted signal
                drop = 0.0 if k == 0 or cond.truncation_layer >= cliff else np.where(hard[idx], 2.0, 0.2)
                gold = clean[idx] - drop + 0.05 * rng.standard_normal(len(idx)).astype(np.float32) * (k > 0)
                values = dict(text_states=codec.encode_bf16(text), gold_logprob=gold.astype(np.float32),
                              candidate_logprob=np.zeros((len(idx), 2), np.float32),
                              status=np.ones(len(idx), np.uint8), error=np.array([""] * len(idx), dtype=object))
                if cond.records_visual:
                    vis = rng.standard_normal((len(idx) * tokens, layers, hidden), dtype=np.float32)
                    values["visual_states"] = codec.encode_bf16(vis)
                w.submit(ShardPayload(k, shard, values))
            print(f"\r  writing shard {shard + 1}/{layout.n_shards}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return size_on_disk(path)


def samples_for(gb: float, workdir: Path, hidden: int, layers: int, tokens: int, spc: int) -> int:
    """Samples that make about ``gb`` GB on disk: bytes per sample measured on a two-shard store first."""
    probe = workdir / "probe.zarr"
    size = write_store(probe, 2 * spc, hidden, layers, tokens, spc, seed=1)
    shutil.rmtree(probe)
    return max(2 * spc, int(gb * 1e9 / (size / (2 * spc))) // spc * spc)


def run_child(store: Path, out: Path, trace: bool, extra: list[str]) -> dict:
    """The CLI in a child; its peak RSS from wait4 (ru_maxrss, KiB on Linux) and the per-metric records."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(out), "1" if trace else "0", *extra],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"gapcache analyze failed on {store} (exit {proc.returncode})")
    rec = next(json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("RECORDS "))
    summary = json.loads((out / "summary.json").read_text())["stores"]["store"]
    return {"seconds": time.perf_counter() - t0, "peak_rss": rec["vm_hwm"], "metrics": rec["metrics"],
            "summary": summary}


def report(name: str, size: int, res: dict) -> None:
    s = res["summary"]["metrics"]
    print(f"{name}: {size / 1e9:.2f} GB on disk, analysed in {res['seconds']:.0f} s, peak RSS "
          f"{res['peak_rss'] / 1e9:.3f} GB ({res['peak_rss'] / size:.3f} x the store), load {_load()}")
    for metric, r in res["metrics"].items():
        traced = f", tracemalloc peak {r['traced_peak'] / 1e6:.0f} MB" if "traced_peak" in r else ""
        print(f"    {metric:7s} {r['seconds']:7.1f} s  RSS before {r['rss_before'] / 1e6:7.0f} MB  "
              f"high-water after {r['hwm_after'] / 1e6:7.0f} MB{traced}")
    task = next(iter(s["probes"]))
    acc = s["probes"][task]["original"]["prediction"]["accuracy"]
    print(f"    cliff layer {res['summary'].get('cliff_layer')}, probe accuracy ({task}, prediction) "
          f"{[round(a, 2) for a in acc]}")


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-gb", type=float, nargs=2, default=(2.0, 8.0))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the stores (paths printed) for --store")
    ap.add_argument("--store", action="append", help="reuse a store (twice: small then large)")
    ap.add_argument("--trace", action="store_true", help="also each metric's tracemalloc peak (slower)")
    ap.add_argument("--analyze-args", default="", help="extra `gapcache analyze` arguments, e.g. '--scheduler threads'")
    args = ap.parse_args()
    from gapcache.store.reader import size_on_disk

    tmp = Path(tempfile.mkdtemp(prefix="gapcache-mem-", dir=args.workdir))
    dims = (args.hidden, args.layers, args.tokens, args.samples_per_shard)
    try:
        stores = [Path(s) for s in args.store or []]
        if not stores:
            print(f"free disk in {tmp}: {shutil.disk_usage(tmp).free / 1e9:.1f} GB")
            for gb in args.sizes_gb:
                n = samples_for(gb, tmp, *dims)
                path = tmp / f"store_{gb:g}gb.zarr"
                t0 = time.perf_counter()
                write_store(path, n, *dims)
                print(f"wrote {path}: {n} samples, {size_on_disk(path) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
                stores.append(path)
        results = []
        for k, path in enumerate(stores):
            res = run_child(path, tmp / f"analysis{k}", args.trace, args.analyze_args.split())
            size = size_on_disk(path)
            report(path.name, size, res)
            results.append((size, res))
        (a_size, a), (b_size, b) = results[0], results[-1]
        ratio = b["peak_rss"] / a["peak_rss"]
        print(f"peak RSS {b['peak_rss'] / 1e9:.3f} GB ({b_size / 1e9:.2f} GB store) / {a['peak_rss'] / 1e9:.3f} GB "
              f"({a_size / 1e9:.2f} GB store) = {ratio:.3f} (target <= 1.2; larger store's peak target < 2 GB: "
              f"{'met' if b['peak_rss'] < 2e9 else 'MISSED'}); store size ratio {b_size / a_size:.2f}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
