"""Overhead of each single-layer patching hook kind against a plain forward (issue 13, benchmark).

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_patching.py [--device cuda] \
        [--hidden 512 --layers 8 --image-size 128 --patch-size 8 --batch-size 8 --batches 4 --layer 4]

The compute-bound benchmark model of ``bench_extract.py`` (random-weight LLaVA, hidden 512, 8 layers, 256
visual tokens). For ``original`` and each ``patched_<channel>_<strategy>_L<layer>``: ``Extraction.forward`` of
the same processed batches (text sites recorded, gold and candidate log-probs), round robin over the
conditions, best of ``--repeats`` wall time and process CPU time; prints each condition's time / original's
(target for the hooks that act in place: <= 1.05). ``swap`` also runs its donor forward (vision tower and
layers 0..l-1, once per batch: the cache is cleared before every repeat), so its expected ratio is about
1 + l / n_layers plus the vision tower's share, not 1.05.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=4, help="the patched layer l")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch

    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction
    from gapcache.extract.tiny import build_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    side, patch = args.image_size, args.patch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_tiny_checkpoint(
            "llava", work / "ckpt", seed=0, hidden_size=args.hidden, num_layers=args.layers,
            vision_config={"image_size": side, "patch_size": patch},
            image_processor={"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}},
            image_seq_length=(side // patch) ** 2)
        n = args.batch_size * args.batches
        cfg = load_config({
            "model": {"family": "llava", "id": str(ckpt), "dtype": args.dtype},
            "data": {"dataset": "synthetic", "options": {"n": n, "image_size": side, "seed": 0}},
            "extract": {"conditions": ["original", "patched"], "batch_size": args.batch_size, "max_length": 8192,
                        "patch_layers": [args.layer]},
        })
        ex = Extraction(cfg, work / "run").load()
        ex.model.to(args.device)
        ex.plan(show=False)
        ex.ensure_fitted()  # the pre-pass, outside every timing (once per run)
        batches = [list(range(b * args.batch_size, (b + 1) * args.batch_size)) for b in range(args.batches)]
        conds = {c.label: c for c in ex.conditions}
        inputs = {label: [ex.batch_inputs(b, c) for b in batches] for label, c in conds.items()}

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def timed(label) -> tuple[float, float]:
            ex.__dict__.pop("_donor_cache", None)  # swap pays its donor forward every repeat
            sync()
            t, c = time.perf_counter(), time.process_time()
            for b, inp in zip(batches, inputs[label]):
                ex.forward(b, conds[label], inp)
            sync()
            return time.perf_counter() - t, time.process_time() - c

        for label in conds:  # warm-up
            timed(label)
        wall = {label: [] for label in conds}
        cpu = {label: [] for label in conds}
        for _ in range(args.repeats):
            for label in conds:
                w, c = timed(label)
                wall[label].append(w)
                cpu[label].append(c)
        seq = inputs["original"][0]["input_ids"].shape[1]
        print(f"model hidden {args.hidden}, {args.layers} layers, seq {seq}, batch {args.batch_size} x "
              f"{args.batches}, {args.device} {args.dtype}, patched layer {args.layer}; load {_load()}")
        base_w, base_c = min(wall["original"]), min(cpu["original"])
        for label in conds:
            print(f"  {label:<32} wall {min(wall[label]):.3f} s  ratio {min(wall[label]) / base_w:.3f}   "
                  f"cpu {min(cpu[label]):.3f} s  ratio {min(cpu[label]) / base_c:.3f}")


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
