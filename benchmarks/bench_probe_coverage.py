"""Simulated coverage of probe intervals and family-wise error of probe tests: old (OOF sample bootstrap,
sign-flip + Holm over layers, uncorrected "from layer X") against the refit statistics of
gapcache.analyze.probe_stats.

Usage::

    python benchmarks/bench_probe_coverage.py coverage [--reps 200] [--learner centroid|logreg] [--n 48 100 200]
        [--classes 2 4] [--signals 0 1] [--refits 10] [--scheme halves|bootstrap]
    python benchmarks/bench_probe_coverage.py fwer [--reps 200] [--layers 25] [--conditions 3] [--learner ...]

coverage: per (n, classes, signal): ``probe_sim.coverage`` (fresh planted data per replication; the
target is the expected balanced accuracy of the procedure at training size n (k-1)/k; 4 classes are
imbalanced 0.4/0.25/0.2/0.15).  Prints each interval's coverage with its binomial SE.

fwer: global null: an original and ``--conditions`` other conditions whose states are independent
draws from one distribution (chance: no signal), ``--layers`` independent layers.  Old: for each
condition, sign-flip on OOF correctness + Holm over layers (``stats.compare_paired``, the pipeline
before) and "from layer X" from the OOF selectivity CI (``report.decodes_from``).  New:
``probe_stats.compare_conditions`` (Holm over conditions x layers) and ``probe_stats.decodes_from``
over all conditions.  Prints the fraction of replications with at least one false claim.

``--learner centroid`` (default: fast, ``probe_sim.centroid_fit_predict``) or ``logreg`` (the
pipeline's probe, ``probe_stats.sklearn_fit_predict``; ~10 ms a fit).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from gapcache.analyze import probe_sim as sim
from gapcache.analyze import probe_stats as ps
from gapcache.analyze import probes, report, stats

LEARNERS = {"centroid": sim.centroid_fit_predict, "logreg": ps.sklearn_fit_predict}


def run_coverage(args):
    fp = LEARNERS[args.learner]
    for n in args.n:
        for k in args.classes:
            for signal in args.signals:
                t0 = time.perf_counter()
                r = sim.coverage(n, k, signal, args.reps, fit_predict=fp, n_refits=args.refits, scheme=args.scheme,
                                 seed=args.seed, hidden=args.hidden)
                cells = []
                for key in ("old_accuracy", "old_selectivity", "new_accuracy", "new_selectivity"):
                    c = r[key].mean()
                    cells.append(f"{key}={c:.3f}+-{np.sqrt(c * (1 - c) / len(r[key])):.3f}")
                print(f"n={n} K={k} signal={signal} target={r['truth']:.4f} mean_est={r['estimate'].mean():.4f} "
                      f"sd_est={r['estimate'].std(ddof=1):.4f} rms_se={np.sqrt(np.mean(r['se'] ** 2)):.4f} "
                      + " ".join(cells) + f" ({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})",
                      flush=True)


def null_conditions(n, n_conditions, layers, hidden, k, rng):
    """y and {condition: X}: every condition's states independent standard normal (global null, chance)."""
    counts = sim.class_counts(n, sim.PROPORTIONS[k])
    y = rng.permutation(np.repeat(np.arange(k), counts))
    return y, {c: rng.standard_normal((n, layers, hidden)) for c in ["original"] + [f"c{i}" for i in range(n_conditions)]}


def fwer_once(n, n_conditions, layers, hidden, k, seed, fp, refits, scheme, alpha=0.05):
    rng = np.random.default_rng(seed)
    y, Xs = null_conditions(n, n_conditions, layers, hidden, k, rng)
    res0 = ps.cross_validate(Xs["original"], y, seed=seed, fit_predict=fp)
    design = ps.make_design(res0.y, res0.y_control, n_refits=refits, seed=seed, scheme=scheme)
    st = {c: ps.probe_stats(X, y, seed=seed, design=design, fit_predict=fp) for c, X in Xs.items()}
    old_cmp = old_from = False
    for c, s in st.items():
        sel = probes.probe_accuracy_ci(s.result, which="selectivity", n_resamples=999, seed=seed)
        old_from |= report.decodes_from({"layers": s.result.layers, "selectivity_ci": sel.to_dict()}) is not None
        if c != "original":
            corr = [(x.result.oof == x.result.y).T.astype(float) for x in (s, st["original"])]
            old_cmp |= bool(np.any(stats.compare_paired(corr[0], corr[1], n_resamples=999, seed=seed).reject))
    new = ps.compare_conditions({c: (s, st["original"]) for c, s in st.items() if c != "original"}, alpha=alpha)
    new_cmp = any(len(v["survivors"]) for v in new.values())
    new_from = any(v is not None for v in ps.decodes_from(st, alpha=alpha).values())
    return old_cmp, new_cmp, old_from, new_from


def run_fwer(args):
    fp = LEARNERS[args.learner]
    for n in args.n:
        for k in args.classes:
            t0 = time.perf_counter()
            hits = np.array([fwer_once(n, args.conditions, args.layers, args.hidden, k, args.seed + r, fp, args.refits,
                                       args.scheme) for r in range(args.reps)])
            cells = [f"{name}={m:.3f}+-{np.sqrt(m * (1 - m) / args.reps):.3f}" for name, m in
                     zip(("old_compare", "new_compare", "old_from_layer", "new_from_layer"), hits.mean(axis=0))]
            print(f"n={n} K={k} layers={args.layers} conditions={args.conditions}+original " + " ".join(cells)
                  + f" ({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("coverage", "fwer"))
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--learner", choices=list(LEARNERS), default="centroid")
    ap.add_argument("--n", type=int, nargs="+", default=[48, 100, 200])
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--signals", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--conditions", type=int, default=3)
    ap.add_argument("--refits", type=int, default=ps.DEFAULT_REFITS)
    ap.add_argument("--scheme", choices=ps.SCHEMES, default=ps.DEFAULT_SCHEME)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    (run_coverage if args.what == "coverage" else run_fwer)(args)


if __name__ == "__main__":
    main()
