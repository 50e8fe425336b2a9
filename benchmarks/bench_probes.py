"""Probe every layer of one site: 1000 samples x 49 layers x 2048 hidden, with the shuffled control.

Usage::

    python benchmarks/bench_probes.py [--n 1000] [--layers 49] [--hidden 2048] [--k 5] [--cliff 10] \
        [--backend both|batched|sklearn] [--solver lbfgs] [--threads 1] [--n-jobs 1] [--dask] [--ci]

Random float32 states with a label signal planted along one unit direction from layer ``--cliff``
on (the data is built before the clock starts; ``--dask`` wraps it as a dask-backed DataArray chunked
one layer per chunk, the store's read path).  Times :func:`gapcache.analyze.probes.probe_layers`
(k folds x 2 arms = 2k fits per layer) and prints the total, per-layer and per-fit seconds, plus
the accuracy before/after the planted layer as a sanity check; ``--ci`` also times the OOF
bootstrap CIs of accuracy and selectivity (1999 resamples, all layers in one call).

``--backend both`` (default) runs the sklearn path (one Pipeline per fit) and the batched one
(all fits of a layer in lockstep) on the same data, one after the other, and prints their seconds,
the ratio, the largest |difference| over layers of the OOF accuracy and of the control accuracy,
and how many OOF labels differ.  The machine's load (/proc/loadavg) is printed beside each time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from gapcache.analyze import probes


def make_states(n, layers, hidden, cliff, signal, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    w = rng.normal(size=hidden).astype(np.float32)
    w /= np.linalg.norm(w)
    X = rng.standard_normal((n, layers, hidden), dtype=np.float32)
    X[:, cliff:, :] += (signal * np.outer(2 * y - 1, w)).astype(np.float32)[:, None, :]
    return X, y


def as_dask(X):
    import xarray as xr

    da = xr.DataArray(X, dims=("sample", "layer", "hidden"), coords={"sample": np.arange(len(X))})
    return da.chunk({"sample": -1, "layer": 1, "hidden": -1})


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def timed(data, y, args, backend):
    t0 = time.perf_counter()
    res = probes.probe_layers(data, y, n_splits=args.k, seed=0, solver=args.solver, backend=backend,
                              threads=args.threads or None, n_jobs=args.n_jobs)
    return res, time.perf_counter() - t0


def report(res, total, args, backend):
    fits = 2 * args.k * args.layers
    print(f"[{backend}] total {total:.2f} s   per layer {total / args.layers:.3f} s "
          f"(median {np.median(res.seconds):.3f})   per fit {total / fits * 1000:.1f} ms ({fits} fits)   "
          f"load {loadavg()}")
    print(f"[{backend}] accuracy before layer {args.cliff}: {res.accuracy[:args.cliff].mean():.3f}   "
          f"from it on: {res.accuracy[args.cliff:].mean():.3f}   control mean {res.control.mean():.3f}")


def compare(old, new, t_old, t_new):
    d_acc = np.abs(new.accuracy - old.accuracy).max()
    d_ctrl = np.abs(new.control - old.control).max()
    flips = int((new.oof != old.oof).sum()), int((new.oof_control != old.oof_control).sum())
    print(f"sklearn / batched = {t_old / t_new:.2f}x   max |d accuracy| {d_acc:.4g}   max |d control| {d_ctrl:.4g}   "
          f"OOF labels differing: {flips[0]} (accuracy arm), {flips[1]} (control arm) of {old.oof.size} each")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=49)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--k", type=int, default=5, help="folds")
    ap.add_argument("--cliff", type=int, default=10, help="first layer with the planted signal")
    ap.add_argument("--signal", type=float, default=3.0)
    ap.add_argument("--backend", default="both", choices=("both",) + probes.BACKENDS)
    ap.add_argument("--solver", default="lbfgs", help="sklearn solver (backend sklearn)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per fit (0 = library default)")
    ap.add_argument("--n-jobs", type=int, default=1, help="folds in parallel (joblib, backend sklearn)")
    ap.add_argument("--dask", action="store_true")
    ap.add_argument("--ci", action="store_true")
    args = ap.parse_args()
    X, y = make_states(args.n, args.layers, args.hidden, args.cliff, args.signal)
    data = as_dask(X) if args.dask else X
    print(f"n={args.n} layers={args.layers} hidden={args.hidden} k={args.k} solver={args.solver} "
          f"threads={args.threads} n_jobs={args.n_jobs} dask={args.dask} cpus={os.cpu_count()}")
    backends = probes.BACKENDS[::-1] if args.backend == "both" else (args.backend,)
    runs = {}
    for backend in backends:
        runs[backend] = timed(data, y, args, backend)
        report(*runs[backend], args, backend)
    if len(runs) == 2:
        (old, t_old), (new, t_new) = runs["sklearn"], runs["batched"]
        compare(old, new, t_old, t_new)
    res = runs[backends[-1]][0]
    if args.ci:
        t0 = time.perf_counter()
        probes.probe_accuracy_ci(res)
        probes.probe_accuracy_ci(res, which="selectivity")
        took = time.perf_counter() - t0
        print(f"OOF bootstrap CIs (accuracy + selectivity, 1999 resamples, all layers): {took:.1f} s")


if __name__ == "__main__":
    main()
