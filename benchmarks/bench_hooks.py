"""Overhead of each intervention hook kind against the plain forward (issue 15; target <= 1.05).

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_hooks.py [--device cuda] \
        [--hidden 512 --layers 8 --batch-size 8 --batches 2 --repeats 3 --L 3 --window 2 5] [--json out.json]

The compute-bound model of ``bench_extract.py`` (random-weight LLaVA, hidden 512, 8 layers, 256 visual
tokens). Over the same processed batches, interleaved ``--repeats`` times (best of each, wall and process
CPU seconds):

- ``plain``: ``model(**inputs, use_cache=False, logits_to_keep=<gold positions>)``, nothing installed;
- ``Extraction.forward`` under ``original`` (state capture at every layer and scoring: no intervention);
- ``Extraction.forward`` under ``truncated_{zero,drop,norm_noise}_L<L>`` and ``window_{zero,drop}_L<a>to<b>``.

Prints each one's time over ``plain`` and over ``original`` (the hook alone: what the intervention adds to
the capture every condition pays).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--L", type=int, default=3, help="truncation layer")
    ap.add_argument("--window", type=int, nargs=2, default=[2, 5], help="window layers a b")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import torch

    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction
    from gapcache.extract.tiny import build_tiny_checkpoint

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    side, patch = a.image_size, a.patch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("GAPCACHE_CACHE", str(work / "cache"))
        ckpt = build_tiny_checkpoint(
            "llava", work / "ckpt", seed=0, hidden_size=a.hidden, num_layers=a.layers,
            vision_config={"image_size": side, "patch_size": patch},
            image_processor={"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}},
            image_seq_length=(side // patch) ** 2)
        cfg = load_config({
            "model": {"family": "llava", "id": str(ckpt), "dtype": a.dtype,
                      "device_map": str(device) if device.type == "cuda" else None},
            "data": {"dataset": "synthetic", "options": {"n": a.batch_size * a.batches, "image_size": side, "seed": 0}},
            "extract": {"conditions": ["original", "truncated", "window"], "batch_size": a.batch_size,
                        "max_length": 8192, "truncation_layers": [a.L],
                        "truncation_strategies": ["zero", "drop", "norm_noise"],
                        "truncation_windows": [list(a.window)], "window_strategies": ["zero", "drop"]},
        })
        ex = Extraction(cfg, work / "run").load()
        ex.plan(show=False)
        model = ex.model
        batches = [list(range(b * a.batch_size, (b + 1) * a.batch_size)) for b in range(a.batches)]
        conds = {c.label: c for c in ex.conditions}
        inputs = {label: [ex.batch_inputs(b, c) for b in batches] for label, c in conds.items()}
        keeps = [torch.tensor(sorted({ex.planned[i].prediction + t for i in b
                                      for t in range(len(ex.planned[i].answer_ids))}), device=device) for b in batches]

        def plain():
            with torch.inference_mode():
                for x, keep in zip(inputs["original"], keeps):
                    model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}, use_cache=False,
                          logits_to_keep=keep)

        def hooked(label):
            return lambda: [ex.forward(b, conds[label], x) for b, x in zip(batches, inputs[label])]

        runs = {"plain": plain, **{label: hooked(label) for label in conds}}
        for fn in runs.values():  # warm-up: one pass of each
            fn()
        sync()
        wall = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        load = [os.getloadavg()]
        for _ in range(a.repeats):
            for k, fn in runs.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        load.append(os.getloadavg())
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(f"hook overhead: llava hidden {a.hidden} x {a.layers} layers, {(side // patch) ** 2} visual tokens, batch "
          f"{a.batch_size} x {a.batches}, {a.dtype} on {device}, {torch.get_num_threads()} torch threads, best of "
          f"{a.repeats}; load {tuple(round(x, 2) for x in load[0])} -> {tuple(round(x, 2) for x in load[1])}")
    print(f"  {'':<28s} {'wall s':>8s} {'/plain':>7s} {'/orig':>7s} {'cpu s':>8s} {'/plain':>7s} {'/orig':>7s}")
    for k in runs:
        print(f"  {k:<28s} {best[k]:8.2f} {best[k] / best['plain']:7.3f} {best[k] / best['original']:7.3f} "
              f"{best_cpu[k]:8.2f} {best_cpu[k] / best_cpu['plain']:7.3f} {best_cpu[k] / best_cpu['original']:7.3f}")
    res = {"wall_s": wall, "cpu_s": cpu, "best_wall_s": best, "best_cpu_s": best_cpu, "loadavg": load,
           "device": str(device), "args": vars(a) | {"json": str(a.json)}}
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
