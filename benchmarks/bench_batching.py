"""Batched forward with right padding vs one sample at a time, through the real runner.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_batching.py [--n 32] [--hidden 256] [--layers 4]

Builds a random-weight LLaVA-style checkpoint, extracts the `original` condition of n synthetic
samples with batch_size 1 and 8 (same store layout), and prints the wall times and the
speed-up of batching. Planning and model loading are excluded from the timings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gapcache.config import load_config
from gapcache.extract.runner import Extraction
from gapcache.extract.tiny import build_tiny_checkpoint


def timed_run(model_dir, n, batch, out):
    cfg = load_config({
        "model": {"family": "llava", "id": str(model_dir)},
        "data": {"dataset": "synthetic", "options": {"n": n, "image_size": 64}},
        "extract": {"conditions": ["original"], "batch_size": batch, "samples_per_shard": 16},
    })
    ex = Extraction(cfg, out).load()
    ex.plan(show=False)
    t0 = time.perf_counter()
    ex.run(show=False)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_tiny_checkpoint("llava", model_dir, hidden_size=args.hidden, num_layers=args.layers)
        timed_run(model_dir, 8, 8, Path(tmp) / "warm")  # warm-up
        one = timed_run(model_dir, args.n, 1, Path(tmp) / "b1")
        eight = timed_run(model_dir, args.n, 8, Path(tmp) / "b8")
    print(f"n={args.n} hidden={args.hidden} layers={args.layers}")
    print(f"batch 1: {one:.2f} s   batch 8: {eight:.2f} s   speed-up {one / eight:.2f}x")


if __name__ == "__main__":
    main()
