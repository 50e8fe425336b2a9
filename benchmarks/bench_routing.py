"""Overhead of MoE routing capture (``extract.routing: true``) against the same forward without it.

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_routing.py [--device cuda] \
        [--hidden 512 --layers 8 --experts 64 --top-k 8 --batches 6 --repeats 5] [--json out.json]

A random-weight Qwen3-VL-MoE (``build_tiny_checkpoint("qwen3_vl_moe", ...)``, every layer sparse) and
synthetic samples (128 px images); ``Extraction.forward`` (hidden-state capture, scoring, condition
``original``) over the same processed batches, with routing off and on, interleaved ``--repeats`` times.
Prints best and median seconds of each and the ratio on / off (target of issue 14: routing plus
attention summaries <= 1.10 together).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from gapcache.config import ModelConfig, load_config
    from gapcache.extract.data import load_dataset
    from gapcache.extract.models import get_adapter
    from gapcache.extract.runner import Extraction
    from gapcache.extract.tiny import build_tiny_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_routing_"))
    text = dict(num_experts=a.experts, num_experts_per_tok=a.top_k, moe_intermediate_size=a.hidden,
                intermediate_size=2 * a.hidden)
    path = build_tiny_checkpoint("qwen3_vl_moe", tmp / "ckpt", hidden_size=a.hidden, num_layers=a.layers,
                                 text_config=text)
    mcfg = dict(family="qwen3_vl_moe", id=str(path), dtype=a.dtype, device_map=a.device)
    model, processor = get_adapter("qwen3_vl_moe").load(ModelConfig(**mcfg))
    n = a.batch_size * a.batches
    samples = load_dataset("synthetic", n=n, image_size=a.image_size)
    runs = {}
    for routing in (False, True):
        cfg = load_config({"model": mcfg, "data": {"dataset": "synthetic", "options": {"n": n}},
                           "extract": {"conditions": ["original"], "batch_size": a.batch_size, "routing": routing}})
        ex = Extraction(cfg, tmp / f"out{int(routing)}", model=model, processor=processor).load()
        ex.plan(samples, show=False)
        idx = [i for i, p in enumerate(ex.planned) if p.ok]
        batches = [idx[b : b + a.batch_size] for b in range(0, len(idx), a.batch_size)]
        inputs = [ex.batch_inputs(b, ex.conditions[0]) for b in batches]
        runs[routing] = (ex, batches, inputs)

    def once(routing):
        ex, batches, inputs = runs[routing]
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b, x in zip(batches, inputs):
            ex.forward(b, ex.conditions[0], x)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once(False), once(True)  # warm-up
    t = {False: [], True: []}
    for _ in range(a.repeats):
        for routing in (False, True):
            t[routing].append(once(routing))
    ex = runs[True][0]
    seq = max(len(p.prompt_ids) for p in ex.planned)
    out = {"device": a.device, "dtype": a.dtype, "hidden": a.hidden, "layers": a.layers, "experts": a.experts,
           "top_k": a.top_k, "batch_size": a.batch_size, "batches": a.batches, "prompt_tokens": seq,
           "off_s": {"best": min(t[False]), "median": statistics.median(t[False])},
           "on_s": {"best": min(t[True]), "median": statistics.median(t[True])}}
    out["ratio_best"] = out["on_s"]["best"] / out["off_s"]["best"]
    out["ratio_median"] = out["on_s"]["median"] / out["off_s"]["median"]
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
