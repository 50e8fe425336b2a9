"""Singular values for effective rank: Gram path vs full SVD on visual-span-sized matrices.

Usage::

    python benchmarks/bench_rank.py [--tokens 576] [--hidden 4096] [--n 20] [--threads N]

Times ``singular_values(h, 'gram')`` (eigvalsh of the tokens x tokens Gram matrix, what
``effective_rank`` uses when tokens < hidden) against ``np.linalg.svd(h, compute_uv=False)`` on
``n`` random centred float64 matrices (median of the per-matrix times), checks that both give the
same effective rank, and prints the speed-up. Set --threads (or OMP_NUM_THREADS) to pin BLAS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np

    from gapcache.analyze.rank import center, entropy_rank, default_rtol, singular_values

    rng = np.random.default_rng(0)
    mats = [center(rng.standard_normal((args.tokens, args.hidden))) for _ in range(args.n)]
    rtol = default_rtol(args.tokens, args.hidden)

    def timed(fn):
        times, ers = [], []
        for m in mats:
            t0 = time.perf_counter()
            s = fn(m)
            times.append(time.perf_counter() - t0)
            ers.append(float(entropy_rank(s, rtol)))
        return statistics.median(times), ers

    timed(lambda m: singular_values(m, "gram"))  # warm-up
    t_gram, er_gram = timed(lambda m: singular_values(m, "gram"))
    t_svd, er_svd = timed(lambda m: np.linalg.svd(m, compute_uv=False))
    diff = max(abs(a - b) for a, b in zip(er_gram, er_svd))
    print(f"matrices: {args.n} x ({args.tokens} x {args.hidden}) float64, numpy {np.__version__}, "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}, python {sys.version.split()[0]}")
    print(f"gram (eigvalsh of H H^T): {t_gram * 1e3:8.1f} ms / matrix (median)")
    print(f"svd  (compute_uv=False) : {t_svd * 1e3:8.1f} ms / matrix (median)")
    print(f"speed-up: {t_svd / t_gram:.1f}x   max |ER_gram - ER_svd| = {diff:.2e}")


if __name__ == "__main__":
    main()
