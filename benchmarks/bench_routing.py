"""Overhead of MoE routing capture (``extract.routing: true``), alone or with the attention summaries
(``--attention``: ``extract.attention: true`` too), against the same forward without either.

Usage::

    HF_HUB_OFFLINE=1 GAPCACHE_CACHE=$(mktemp -d) python benchmarks/bench_routing.py [--device cuda] \
        [--attention] [--hidden 512 --layers 8 --experts 64 --top-k 8 --batches 6 --repeats 5] [--json out.json]

A random-weight Qwen3-VL-MoE (``build_tiny_checkpoint("qwen3_vl_moe", ...)``, every layer sparse) and
synthetic samples (128 px images); ``Extraction.forward`` (hidden-state capture, scoring, condition
``original``) over the same processed batches, with the options off and on, interleaved ``--repeats``
times (the order alternating: off-on, on-off, ...). Prints best and median seconds of each (wall, and the
process's CPU seconds: with ``--threads 1`` the forward's own compute, less disturbed by other jobs), the
ratios on / off (of the bests, of the medians, and the median of each repeat's paired on / off; target of
issue 14: routing plus attention summaries <= 1.10 together) and the arrays the on
arm's forward returned beyond the off arm's (``on_records``: route_* and, with ``--attention``, attn_*).
``--control``: both arms off (A/A), the ratio's noise floor on a shared machine.

Measured (CPU, 2 cores shared with two other agents' jobs, ``--threads 1``, float32, batches of 4 x 4 prompts
of 95 tokens; load = ``uptime`` 1-minute load average before -> after the run). Ratios on / off: of the
bests, of the medians, paired median (wall; the process's CPU seconds in brackets)::

    default sizes (hidden 256, 4 layers, 32 experts top-4), --repeats 21, off best 0.69-0.75 s
      --control (A/A)          0.962 / 1.010 / 1.003  (0.965 / 0.997 / 1.000)   load 1.8 -> 3.3
      --attention (+ routing)  1.146 / 1.109 / 1.026  (1.071 / 1.003 / 1.031)   load 3.3 -> 4.1
      routing alone            0.998 / 0.939 / 1.000  (1.027 / 0.960 / 0.985)   load 4.1 -> 4.6
    --hidden 512 --layers 8, --repeats 11, off best 5.7-6.4 s
      --control (A/A)          0.975 / 1.029 / 1.004  (0.951 / 1.022 / 1.004)   load 4.6 -> 5.3
      --attention (+ routing)  0.826 / 1.052 / 1.026  (1.065 / 1.019 / 1.041)   load 5.3 -> 4.9

On this machine the best and the median of one arm move by 5-15 % between runs (the A/A lines), more than
the options cost; the paired median is the steadiest figure: routing + attention ~1.03-1.04, routing alone
~1.00, within the target of 1.10. Not measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def extract_options(on: bool, attention: bool, control: bool = False) -> dict:
    """The ``extract`` options an arm turns on: nothing (off); routing, plus the attention summaries when
    ``attention`` (on); nothing either when ``control`` (an A/A run: the ratio's noise floor)."""
    on = on and not control
    return {"routing": on, "attention": on and attention}


def main(argv=None):
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
    ap.add_argument("--attention", action="store_true", help="the on arm records the attention summaries too")
    ap.add_argument("--control", action="store_true", help="A/A: the on arm turns nothing on (the noise floor)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

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
                           "extract": {"conditions": ["original"], "batch_size": a.batch_size,
                                       **extract_options(routing, a.attention, a.control)}})
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
        t0, c0 = time.perf_counter(), time.process_time()
        for b, x in zip(batches, inputs):
            rows = ex.forward(b, ex.conditions[0], x)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, set(rows[0])

    (*_, off_keys), (*_, on_keys) = once(False), once(True)  # warm-up; the arrays each arm returns
    t = {False: [], True: []}
    c = {False: [], True: []}  # process CPU seconds (all threads): less sensitive than wall time to other jobs
    for r in range(a.repeats):
        for routing in ((False, True) if r % 2 == 0 else (True, False)):
            wall, cpu, _ = once(routing)
            t[routing].append(wall)
            c[routing].append(cpu)
    ex = runs[True][0]
    seq = max(len(p.prompt_ids) for p in ex.planned)
    out = {"device": a.device, "dtype": a.dtype, "hidden": a.hidden, "layers": a.layers, "experts": a.experts,
           "top_k": a.top_k, "attention": a.attention, "control": a.control, "threads": torch.get_num_threads(),
           "batch_size": a.batch_size, "batches": a.batches, "prompt_tokens": seq,
           "off_s": {"best": min(t[False]), "median": statistics.median(t[False])},
           "on_s": {"best": min(t[True]), "median": statistics.median(t[True])},
           "off_cpu_s": {"best": min(c[False]), "median": statistics.median(c[False])},
           "on_cpu_s": {"best": min(c[True]), "median": statistics.median(c[True])}}
    out["ratio_best"] = out["on_s"]["best"] / out["off_s"]["best"]
    out["ratio_median"] = out["on_s"]["median"] / out["off_s"]["median"]
    out["cpu_ratio_best"] = out["on_cpu_s"]["best"] / out["off_cpu_s"]["best"]
    out["cpu_ratio_median"] = out["on_cpu_s"]["median"] / out["off_cpu_s"]["median"]
    # each repeat's on / off (adjacent in time, so a slow spell of the machine hits both): their median
    out["ratio_paired_median"] = statistics.median(x / y for x, y in zip(t[True], t[False]))
    out["cpu_ratio_paired_median"] = statistics.median(x / y for x, y in zip(c[True], c[False]))
    out["on_records"] = sorted(on_keys - off_keys)
    out["runs_s"] = {"off": t[False], "on": t[True], "off_cpu": c[False], "on_cpu": c[True]}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
