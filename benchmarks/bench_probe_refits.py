"""The probe statistics' refits: lbfgs lockstep vs exact Newton fits, side by side on the same design.

Usage::

    python benchmarks/bench_probe_refits.py [--n 32] [--classes 4] [--layers 5] [--hidden 128] \
        [--signal 1.0] [--refits 10] [--repeats 2] [--threads 1]

Planted float32 states (``gapcache.analyze.probe_sim.planted``: the class one-hot times ``--signal`` added
to the first K hidden units, every layer) shaped like one (task, condition, site) of the demo store
(32 samples, 4 classes, hidden 128, 5 layers). Times :func:`gapcache.analyze.probe_stats.refit_scores`
(2R halves x k folds x 2 arms = 200 fits per layer at R = 10) with ``batched_fit_predict`` (lbfgs iterates
in lockstep, sklearn's stopping point) and with ``exact_fit_predict`` (Newton to the optimum), alternating,
best of ``--repeats``; prints both, the ratio, the largest |difference| of a refit score and of the
refit SE per layer. The machine's load (/proc/loadavg) is printed beside the times.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from gapcache.analyze import probe_sim, probe_stats as ps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--classes", type=int, default=4, choices=(2, 4))
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--signal", type=float, default=1.0)
    ap.add_argument("--refits", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    X, y = probe_sim.planted(args.n, probe_sim.PROPORTIONS[args.classes], args.signal, rng, hidden=args.hidden,
                             layers=args.layers)
    X = X.astype(np.float32)  # (sample, layer, hidden), the store's dtype
    design = ps.make_design(y, rng.permutation(y), n_refits=args.refits, n_splits=5, seed=0)
    arms = {"lbfgs": ps.batched_fit_predict, "exact": ps.exact_fit_predict}
    best, reps = {k: np.inf for k in arms}, {}
    for _ in range(args.repeats):
        for name, fit in arms.items():
            t = time.perf_counter()
            reps[name] = ps.refit_scores(X, design, fit_predict=lambda *a, f=fit, **kw: f(*a, **kw, threads=args.threads))
            best[name] = min(best[name], time.perf_counter() - t)
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    score = max(np.abs(reps["lbfgs"][a] - reps["exact"][a]).max() for a in reps["lbfgs"])
    se = {k: ps.standard_error(reps[k]["accuracy"])[0] for k in arms}
    print(f"n {args.n}, {args.classes} classes, {args.layers} layers x hidden {args.hidden}, R = {args.refits} "
          f"({len(design.splits())} fits per arm and layer), load {load}")
    print(f"refits: lbfgs {best['lbfgs']:.3f} s, exact {best['exact']:.3f} s, ratio {best['lbfgs'] / best['exact']:.1f}x")
    print(f"largest |refit score difference| {score:.4f}; SE lbfgs {np.round(se['lbfgs'], 4).tolist()} "
          f"exact {np.round(se['exact'], 4).tolist()}")


if __name__ == "__main__":
    main()
