"""The ``gapcache`` command.

Usage::

    gapcache demo --out demo_out                        # the whole main job on the embedded default
    gapcache extract configs/qwen2.5-vl-7b.yaml --out runs/q25 [--limit N]
    gapcache extract CONFIG --out DIR --check 3         # sites and decoded tokens, writes nothing
    gapcache extract CONFIG --out DIR --dry-run         # store size and write bandwidth needed
    gapcache info runs/q25/store.zarr [--json]
    gapcache analyze runs/q25/store.zarr --out runs/q25/analysis [--cliff-layer 11] [--scheduler slurm]
    gapcache slurm plan|submit CONFIG [--out RUN]     # GPU array over (condition, shard) + chained CPU analysis
    gapcache slurm status RUN
    gapcache verify STORE | gapcache merge A B --out C | gapcache freeze STORE

Exit codes: 0 ok, 1 a gapcache error or an environment fault such as a full disk (one line on stderr;
``extract``: also when every sample failed), 2 bad command line, 130 interrupted (Ctrl-C). The table of
every bad input and fault: docs/faults.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gapcache import __version__, plugins
from gapcache.errors import GapcacheError


def __getattr__(name):
    """``METRIC_NAMES``: the registered analysis metrics, read from gapcache.analyze.metrics on access."""
    if name == "METRIC_NAMES":
        from gapcache.analyze.metrics import names

        return names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gapcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"gapcache {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="summarize a store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    an = sub.add_parser("analyze", help="CPU tier: metrics, CIs, figures and a report from store(s)")
    an.add_argument("stores", nargs="+", help="one or more stores (two or more: EVD gaps between them)")
    an.add_argument("--out", required=True, help="directory for summary.json, results, figures, report.html")
    from gapcache.analyze.metrics import registered  # the metric registry: --metrics default and help

    an.add_argument("--metrics", default=",".join(m.name for m in registered()),
                    help="comma list, run in this order (default: all): "
                         + "; ".join(f"{m.name} ({m.description})" for m in registered()))
    an.add_argument("--cliff-layer", type=int, help="fix the cliff layer for every metric and figure")
    an.add_argument("--cliff-method", default="steepest", choices=["median_evd", "steepest", "first_crossing"])
    an.add_argument("--strategy", default="zero", help="truncation strategy that defines Delta/EVD (zero|drop)")
    an.add_argument("--tau", type=float, help="fixed EVD threshold (default: adaptive)")
    an.add_argument("--tau-ratio", type=float, default=0.1, help="adaptive tau = ratio x max of the mean Delta curve")
    an.add_argument("--n-resamples", type=int, default=1999, help="bootstrap resamples per interval")
    an.add_argument("--probe-refits", type=int, default=10,
                    help="probe statistics: random half-splits whose refitted cross-validations give the probe SEs")
    an.add_argument("--ci-method", default="percentile", choices=["percentile", "BCa", "basic"])
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--scheduler", default="threads", help="threads | processes | ADDRESS | slurm")
    an.add_argument("--jobs", type=int, help="processes for the probe fits and the figures: this one and N - 1 workers "
                    "(default: the CPUs this process may use; 1: no workers); the numbers do not depend on it")
    an.add_argument("--site", default="", help="comma list of text sites to analyse besides the store's own, derived "
                    "from the token span (extract.text: all): <group>_<mean|first|last>, group question, template, "
                    "special or text (e.g. question_mean,question_first)")
    an.add_argument("--cka-text", default="question", help="text tokens the geometry CKA compares with the visual "
                    "ones: question (default), template, special or text (every prompt text token)")
    an.set_defaults(func=cmd_analyze)

    for register in plugins.load(plugins.COMMANDS).values():  # extract + demo, verify/merge/freeze/migrate, slurm
        register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)  # every subcommand sets its handler (set_defaults(func=...))
    except GapcacheError as err:
        print(f"gapcache {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gapcache {args.command}: interrupted (Ctrl-C); what was flagged done is kept, rerun the same "
              "command to resume.", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permissions, a vanished file: the environment, not gapcache
        if args.verbose:
            raise
        where = f" ('{err.filename}')" if err.filename else ""
        print(f"gapcache {args.command}: error: {err.strerror or err}{where}. Free space, fix the permissions or "
              "choose another path, then rerun (-v shows the traceback).", file=sys.stderr)
        return 1


def load_cli_config(path, limit=None):
    """A config file, with ``--limit`` applied and validated again."""
    from gapcache.config import load_config

    cfg = load_config(path)
    if limit is not None:
        cfg.data.limit = limit
        cfg = load_config(cfg)
    return cfg


def cmd_info(args) -> int:
    from gapcache.store import info

    data = info(args.store)
    print(json.dumps(data, indent=2) if args.json else format_info(args.store, data))
    return 0


def format_info(path, data=None) -> str:
    from gapcache.store import info

    d = data or info(path)
    m = d["model"]
    lines = [
        f"store      {d['path']}",
        f"schema     v{d['schema_version']} (gapcache {d['gapcache_version']})",
        f"model      {m.get('id')} [{m.get('family')}, {m.get('class')}, {m.get('dtype')}, {m.get('n_layers')} layers"
        + (f", deepstack adds after layers {', '.join(map(str, d['deepstack_layers']))}" if d.get("deepstack_layers")
           else "") + "]",
        f"dataset    {d['dataset'].get('name')} / {d['dataset'].get('split')}: {d['n_samples']} samples, "
        f"{d['n_failed_samples']} with a failure",
        f"states     {len(d['layers'])} layers x {d['hidden']} hidden, {d['state_dtype']} ({d['state_encoding']}, "
        f"{d.get('state_compression', '?')}), "
        f"sites {', '.join(d['sites'])} + visual ({d['visual'].get('mode')})",
        f"size       {d['size_bytes'] / 1e6:.1f} MB on disk" if d["size_bytes"] is not None
        else "size       unknown (remote store that cannot be listed)",
        f"complete   {'yes' if d['complete'] else 'no'}",
        "conditions:",
    ]
    for label, c in d["conditions"].items():
        lines.append(f"  {label:<24} done {c['done']:>6}  failed {c['failed']:>5}  pending {c['pending']:>6}")
    return "\n".join(lines)


def cmd_analyze(args) -> int:
    from gapcache.analyze.pipeline import AnalysisParams, run_analysis

    p = AnalysisParams(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), tau=args.tau, tau_ratio=args.tau_ratio,
        cliff_method=args.cliff_method, cliff_layer=args.cliff_layer, strategy=args.strategy,
        n_resamples=args.n_resamples, ci_method=args.ci_method, seed=args.seed, scheduler=args.scheduler,
        sites=tuple(x.strip() for x in args.site.split(",") if x.strip()), cka_text=args.cka_text,
        n_refits=args.probe_refits, jobs=args.jobs,
    )
    summary = run_analysis(args.stores, args.out, p)
    from gapcache.analyze.report import key_numbers

    for name, s in summary["stores"].items():
        print(f"[{name}] {s['path']}")
        for k, v in key_numbers(s):
            print(f"  {k:<48} {v}")
    print(f"\nsummary: {args.out}/summary.json\nreport:  {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
