"""Overhead and memory of the attention summaries (issue 14, item 1).

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_attention.py [--device cuda] \
        [--hidden 512 --layers 8 --image-size 128 --patch-size 8 --batch-size 8 --batches 4] \
        [--long 4096 [--mem-repeats 3]] [--repeats 0]

1. overhead: ``Extraction.forward`` of the same batches (condition ``original``) with ``extract.attention``
   off and on, alternating, best of ``--repeats`` (0: skip this part); prints on / off (target with routing:
   <= 1.10);
2. memory (``--long N``): one forward of an N-token sequence (random token ids around the image span) three
   ways: plain SDPA, SDPA with the summaries (``AttentionSummaries``), eager ``output_attentions=True``.
   Prints each one's peak memory above what was allocated before it, the extras over plain, and the ratio
   (summaries - plain) / (eager - plain).

   * CUDA: the three forwards in this process, ``torch.cuda.max_memory_allocated`` above the allocation
     before the forwards (weights, inputs);
   * CPU: each forward in a fresh child process (this script re-invoked with ``--child-forward MODE``; the
     model loaded, the inputs built, then ``malloc_trim`` and the high-water mark reset through
     ``/proc/self/clear_refs``): peak = ``VmHWM`` after the forward - ``VmRSS`` before it (``/proc/self/status``).
     ``--mem-repeats`` children per mode, interleaved; the medians are printed.

Measured on CPU (2 cores shared with other jobs; 24 GiB), the default model (LLaVA, hidden 512, 8 layers, 2
heads, float32), ``--repeats 0 --mem-repeats 3 --threads 1``; extras of the three fresh processes per mode,
median in the summary (the RSS before each forward: 783-784 MiB; HWM reset in every child)::

    --long 4096 (load 4.4 -> 5.8)
      plain      226.1, 234.1, 254.1 MiB
      summaries  222.6, 226.5, 225.5 MiB     summaries - plain = -8.6 MiB
      eager     1432.1, 1422.8, 1432.5 MiB   eager - plain = 1198.0 MiB (the 8 x 2 x 4096^2 float32 maps: 1024 MiB)
      ratio (summaries - plain) / (eager - plain) = -0.007
    --long 2048 (load 5.8 -> 5.8)
      plain      161.1, 175.0, 172.4 MiB
      summaries  154.9, 165.4, 157.3 MiB     summaries - plain = -15.1 MiB
      eager      474.5, 457.7, 457.6 MiB     eager - plain = 285.3 MiB
      ratio = -0.053

The summaries' extra is below what fresh processes resolve (plain alone spreads over 14-28 MiB): no
measurable extra, i.e. under ~2.5 % of eager's at 4096 tokens. What they allocate per layer is (heads x
query rows x seq) float32 scores, here 2 x 11 x 4096 x 4 B = 0.34 MiB (2 sites + 9 question tokens),
against eager's 2 x 4096^2 x 4 B = 128 MiB per layer kept. CUDA figures (``--device cuda``): not measured
(no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("plain", "summaries", "eager")  # the long forwards compared (--long)


def main(argv=None):
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
    ap.add_argument("--mem-repeats", type=int, default=3, help="CPU: child processes per long forward mode")
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)  # the child's checkpoint (built by the parent)
    ap.add_argument("--child-forward", choices=MODES, help=argparse.SUPPRESS)  # CPU memory: one forward, then exit
    args = ap.parse_args(argv)

    import torch

    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction
    from gapcache.extract.tiny import build_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    side, patch = args.image_size, args.patch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.ckpt or build_tiny_checkpoint(
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
        if args.child_forward:
            print(json.dumps(child_forward(ex, args.long, args.child_forward)))
            return
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

        seq = inputs[0]["input_ids"].shape[1]
        print(f"model hidden {args.hidden}, {args.layers} layers, seq {seq}, batch {args.batch_size} x {args.batches}, "
              f"{args.device} {args.dtype}, {torch.get_num_threads()} threads")
        if args.repeats:
            timed(True), timed(False)  # warm-up
            on, off = [], []
            for _ in range(args.repeats):
                off.append(timed(False))
                on.append(timed(True))
            print(f"forward off {min(off):.3f} s  on {min(on):.3f} s  ratio on/off {min(on) / min(off):.3f}")
        if args.long:
            if ex.model.device.type == "cuda":
                long_memory(ex, args.long)
            else:
                long_memory_cpu(args, ckpt, args.long)


def long_inputs(ex, n_tokens: int):
    """The n-token sequence (the first sample's prompt, its question's ids repeated before the last prompt
    token), its pixel values and the planned sample moved to it."""
    import dataclasses

    import torch

    p = ex.planned[0]
    ids = torch.tensor(p.prompt_ids)
    pad = n_tokens - len(ids)
    q0, q1 = p.question_span  # more text before the last prompt token: the question's ids repeated
    tail = ids[q0:q1].repeat(-(-pad // (q1 - q0)))[:pad]
    full = torch.cat([ids[:-1], tail, ids[-1:]])[None].to(ex.model.device)
    cond = ex.conditions[0]
    inputs = ex.batch_inputs([0], cond)
    pix = inputs["pixel_values"].to(ex.model.device, ex.model.dtype)
    moved = dataclasses.replace(p, sites={**p.sites, "prediction": n_tokens - 1}, prompt_ids=full[0].tolist())
    return full, pix, moved


def long_memory(ex, n_tokens: int):
    """Peak memory of one n-token forward: summaries vs eager output_attentions (CUDA: max_memory_allocated)."""
    import torch

    from gapcache.extract import attention as att

    full, pix, moved = long_inputs(ex, n_tokens)
    base = torch.cuda.memory_allocated()

    def peak(fn):
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
    report(n_tokens, plain, summ, eager, "peak above weights")


def report(n_tokens: int, plain: float, summ: float, eager: float, what: str) -> None:
    mb = 1 / 2**20
    print(f"{n_tokens} tokens: {what}: plain sdpa {plain * mb:.1f} MiB, summaries {summ * mb:.1f} MiB "
          f"(extra {(summ - plain) * mb:.2f} MiB), eager output_attentions {eager * mb:.1f} MiB "
          f"(extra {(eager - plain) * mb:.1f} MiB); extra ratio summaries/eager "
          f"{(summ - plain) / max(eager - plain, 1):.4f}")


# ---------------------------------------------------------------------- CPU memory: /proc/self/status
def proc_status(text: str | None = None) -> dict[str, int]:
    """Bytes of the ``Vm*`` lines of ``/proc/self/status`` (or of ``text`` in its format, ``VmRSS:  123 kB``)."""
    if text is None:
        with open("/proc/self/status") as f:
            text = f.read()
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def reset_peak() -> bool:
    """Free what glibc holds (``malloc_trim``) and reset VmHWM to the current VmRSS (``clear_refs`` 5, Linux >=
    4.0); False where the reset is not possible (VmHWM then still holds the process's earlier peak)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_peak(fn) -> dict:
    """Run ``fn()``; its peak resident memory above the resident memory before it: ``extra`` = VmHWM after -
    VmRSS before (bytes), with the raw readings and whether the high-water mark was reset first (if not,
    ``extra`` is only a lower bound when ``hwm_after == hwm_before``)."""
    reset = reset_peak()
    before = proc_status()
    fn()
    after = proc_status()
    return {"extra": after["VmHWM"] - before["VmRSS"], "rss_before": before["VmRSS"], "hwm_before": before["VmHWM"],
            "hwm_after": after["VmHWM"], "rss_after": after["VmRSS"], "hwm_reset": reset}


def child_forward(ex, n_tokens: int, mode: str) -> dict:
    """One n-token forward of ``mode`` (MODES) in this (fresh) process; its :func:`cpu_peak` reading."""
    import torch

    from gapcache.extract import attention as att

    full, pix, moved = long_inputs(ex, n_tokens)
    if mode == "eager":
        ex.model.set_attn_implementation("eager")

    def forward():
        kw = dict(input_ids=full, pixel_values=pix, use_cache=False, logits_to_keep=1)
        with torch.inference_mode():
            if mode == "summaries":
                with att.AttentionSummaries(ex.model, ex.adapter, [moved], n_tokens, ex.record) as s:
                    ex.model(**kw)
                assert s.out, "the summaries recorded no layer"
            else:
                out = ex.model(**kw, output_attentions=mode == "eager")
                if mode == "eager":
                    assert len(out.attentions) == ex.n_layers and out.attentions[0].shape[-1] == n_tokens
                del out

    return {"mode": mode, "tokens": n_tokens, **cpu_peak(forward)}


def long_memory_cpu(args, ckpt, n_tokens: int) -> dict:
    """The CPU memory figures: ``--mem-repeats`` fresh children per mode, interleaved; medians of the extras."""
    base = [sys.executable, os.path.abspath(__file__), "--ckpt", str(ckpt), "--long", str(n_tokens),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--image-size", str(args.image_size),
            "--patch-size", str(args.patch_size), "--dtype", args.dtype, "--threads", str(args.threads),
            "--batch-size", "1", "--batches", "1"]
    got = {m: [] for m in MODES}
    for _ in range(args.mem_repeats):
        for mode in MODES:
            r = subprocess.run([*base, "--child-forward", mode], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"the {mode} child failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
            got[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    mb = 1 / 2**20
    for mode in MODES:
        rows = got[mode]
        print(f"  {mode:<9} extra MiB {[round(g['extra'] * mb, 2) for g in rows]}  (RSS before "
              f"{statistics.median(g['rss_before'] for g in rows) * mb:.0f} MiB, HWM reset "
              f"{all(g['hwm_reset'] for g in rows)})")
    med = {m: statistics.median(g["extra"] for g in got[m]) for m in MODES}
    report(n_tokens, med["plain"], med["summaries"], med["eager"],
           f"median peak RSS above the RSS before the forward, {args.mem_repeats} fresh processes each")
    return {"tokens": n_tokens, "median_extra": med, "runs": got}


if __name__ == "__main__":
    main()
