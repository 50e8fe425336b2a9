"""``gapcache extract`` and ``gapcache demo``: the GPU tier's subcommands (registered through the
``gapcache.commands`` entry points, so ``gapcache.cli`` never imports this package).

Usage::

    gapcache extract configs/qwen2.5-vl-7b.yaml --out runs/q25 [--limit N] [--check 3 | --dry-run]
    gapcache demo --out demo_out
"""

from __future__ import annotations

import sys
import time

from gapcache.cli import format_info, load_cli_config


def register(sub) -> None:
    ex = sub.add_parser("extract", help="run the model once per condition into a store (GPU tier)")
    ex.add_argument("config", help="YAML config (see configs/)")
    ex.add_argument("--out", required=True, help="run directory; the store is OUT/store.zarr")
    ex.add_argument("--limit", type=int, help="only the first N samples (overrides data.limit)")
    ex.add_argument("--task-index", type=int, help="this task's index in an array of --n-tasks (Slurm array)")
    ex.add_argument("--n-tasks", type=int, help="number of tasks sharing the (condition, shard) units")
    mode = ex.add_mutually_exclusive_group()
    mode.add_argument("--check", type=int, metavar="N", help="print sites of N samples and time one batch; no writes")
    mode.add_argument("--dry-run", action="store_true", help="print the store size and bandwidth the config needs")
    ex.set_defaults(func=cmd_extract)

    demo = sub.add_parser("demo", help="extract the built-in synthetic data with the built-in model")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--n", type=int, help="number of synthetic samples (default from the demo config)")
    demo.add_argument("--plain", action="store_true", help="run configs/demo.yaml exactly: without the attention "
                      "summaries, the text tokens and the intervention suite the demo adds by default "
                      "(gapcache.config.DEMO_RECORDS, DEMO_SUITE)")
    demo.set_defaults(func=cmd_demo)


def cmd_extract(args) -> int:
    cfg = load_cli_config(args.config, args.limit)
    if args.dry_run:
        from gapcache.extract.estimate import dry_run

        print(dry_run(cfg))
        return 0
    from gapcache.extract.preflight import check_task, preflight
    from gapcache.extract.runner import Extraction

    if args.check is not None:  # writes nothing: no run-directory checks
        check_task(args.task_index, args.n_tasks)
    else:  # everything that needs no model, before the model loads
        preflight(cfg, args.out, args.task_index, args.n_tasks)
    ex = Extraction(cfg, args.out).load()
    if args.check is not None:
        from gapcache.extract.estimate import check

        print(check(ex, args.check))
        return 0
    path = ex.run(task_index=args.task_index, n_tasks=args.n_tasks)
    print(f"store written: {path}")
    print(format_info(path))
    return _exit_if_nothing_done(path)


def _exit_if_nothing_done(path) -> int:
    """1 (with a message) when the store holds no sample done under any condition and nothing pending:
    every sample failed, so no analysis can run. 0 otherwise."""
    from gapcache.store import info

    d = info(path)
    conds = d["conditions"].values()
    if any(c["done"] for c in conds) or any(c["pending"] for c in conds):
        return 0
    print(f"gapcache extract: error: every sample failed under every condition; the store at {path} records "
          "each reason (`gapcache info`, the 'error' array). Fix the config or the data and extract into a new "
          "--out.", file=sys.stderr)
    return 1


def cmd_demo(args) -> int:
    from pathlib import Path

    from gapcache.conditions import expand_config
    from gapcache.config import demo_config, load_config
    from gapcache.extract.runner import Extraction

    d = demo_config(plain=args.plain)
    if args.n is not None:
        d["data"]["options"]["n"] = args.n
    cfg = load_config(d)
    out = Path(args.out)
    from gapcache.extract.preflight import preflight

    preflight(cfg, out)
    print(f"gapcache demo: {cfg.model.id} on {d['data']['options']['n']} synthetic samples, "
          f"{len(cfg.extract.conditions)} condition kinds ({len(expand_config(cfg.extract))} conditions)"
          + ("" if args.plain else ", with attention summaries, every text token and the intervention suite (--plain: without)")
          + f" -> {out}", file=sys.stderr)
    import torch

    from gapcache.config import DEMO_TORCH_THREADS

    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_TORCH_THREADS)  # the tiny model's forwards (gapcache.config.DEMO_TORCH_THREADS)
    t0 = time.perf_counter()
    try:
        ex = Extraction(cfg, out).load()
        path = ex.run()
    finally:
        torch.set_num_threads(threads)
    t_extract = time.perf_counter() - t0
    print(format_info(path))
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis
    from gapcache.analyze.report import key_numbers

    print("analysing (CPU tier) ...", file=sys.stderr)
    t0 = time.perf_counter()
    summary = run_analysis([path], out / "analysis", AnalysisParams())
    t_analyse = time.perf_counter() - t0
    print("\nkey numbers:")
    for k, v in key_numbers(summary["stores"]["store"]):
        print(f"  {k:<48} {v}")
    print(f"\ntiming:   extraction {t_extract:.1f} s (model load + run), analysis {t_analyse:.1f} s "
          f"(analysis / extraction = {t_analyse / t_extract:.2f})")
    print(f"report:   {out / 'analysis' / 'report.html'}")
    print(f"summary:  {out / 'analysis' / 'summary.json'}")
    print(f"\nopen it:  python -c \"import gapcache.store as s; print(s.open_store('{path}'))\"")
    print(f"or plain: python -c \"import xarray as xr; print(xr.open_zarr('{path}'))\"")
    return 0
