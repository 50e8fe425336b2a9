"""Overhead and memory of the attention summaries (issue 14, item 1).

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_attention.py [--device cuda] \
        [--hidden 512 --layers 8 --image-size 128 --patch-size 8 --batch-size 8 --batches 4] [--long 4096]

1. overhead: ``Extraction.forward`` of the same batches (condition ``original``) with ``extract.attention``
   off and on, alternating, best of ``--repeats``; prints on / off (target with routing: <= 1.10);
2. memory (``--long N``, CUDA only): one forward of an N-token sequence (random token ids around the image
   span) with the summaries vs eager ``output_attentions=True``: peak memory above the weights, and ratio.
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
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--long", type=int, default=0)
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
            "extract": {"conditions": ["original"], "batch_size": args.batch_size, "max_length": 8192,
                        "attention": True},
        })
        ex = Extraction(cfg, work / "run").load()
        ex.model.to(args.device)
        ex.plan(show=False)
        cond = ex.conditions[0]
        batches = [list(range(b * args.batch_size, (b + 1) * args.batch_size)) for b in range(args.batches)]
        inputs = [ex.batch_inputs(b, cond) for b in batches]

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def timed(on: bool) -> float:
            ex.cfg.extract.attention = on
            sync()
            t = time.perf_counter()
            for b, inp in zip(batches, inputs):
                ex.forward(b, cond, inp)
            sync()
            return time.perf_counter() - t

        timed(True), timed(False)  # warm-up
        on, off = [], []
        for _ in range(args.repeats):
            off.append(timed(False))
            on.append(timed(True))
        seq = inputs[0]["input_ids"].shape[1]
        print(f"model hidden {args.hidden}, {args.layers} layers, seq {seq}, batch {args.batch_size} x {args.batches}, "
              f"{args.device} {args.dtype}")
        print(f"forward off {min(off):.3f} s  on {min(on):.3f} s  ratio on/off {min(on) / min(off):.3f}")
        if args.long:
            long_memory(ex, args.long)


def long_memory(ex, n_tokens: int):
    """Peak memory of one n-token forward: summaries vs eager output_attentions (CUDA; elsewhere the forwards run
    and no memory is measured)."""
    import torch

    from gapcache.extract import attention as att

    p = ex.planned[0]
    ids = torch.tensor(p.prompt_ids)
    pad = n_tokens - len(ids)
    q0, q1 = p.question_span  # more text before the last prompt token: the question's ids repeated
    tail = ids[q0:q1].repeat(-(-pad // (q1 - q0)))[:pad]
    full = torch.cat([ids[:-1], tail, ids[-1:]])[None].to(ex.model.device)
    cond = ex.conditions[0]
    inputs = ex.batch_inputs([0], cond)
    pix = inputs["pixel_values"].to(ex.model.device, ex.model.dtype)
    import dataclasses

    moved = dataclasses.replace(p, sites={**p.sites, "prediction": n_tokens - 1}, prompt_ids=full[0].tolist())
    cuda = ex.model.device.type == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0

    def peak(fn):
        if not cuda:
            with torch.inference_mode():
                fn()
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak(lambda: ex.model(input_ids=full, pixel_values=pix, use_cache=False, logits_to_keep=1))
    with att.AttentionSummaries(ex.model, ex.adapter, [moved], n_tokens, ex.record):
        summ = peak(lambda: ex.model(input_ids=full, pixel_values=pix, use_cache=False, logits_to_keep=1))
    ex.model.set_attn_implementation("eager")
    eager = peak(lambda: ex.model(input_ids=full, pixel_values=pix, use_cache=False, logits_to_keep=1,
                                  output_attentions=True))
    ex.model.set_attn_implementation("sdpa")
    mb = 1 / 2**20
    print(f"{n_tokens} tokens: peak above weights: plain sdpa {plain * mb:.0f} MiB, summaries {summ * mb:.0f} MiB "
          f"(extra {(summ - plain) * mb:.0f} MiB), eager output_attentions {eager * mb:.0f} MiB "
          f"(extra {(eager - plain) * mb:.0f} MiB); extra ratio summaries/eager "
          f"{(summ - plain) / max(eager - plain, 1):.4f}")


if __name__ == "__main__":
    main()
