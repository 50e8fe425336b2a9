"""Where a store's analysis spends its time, and what glibc's malloc settings cost it: `gapcache analyze` in child
processes, side by side, with gapcache's settings (``workers.tune_malloc``) and with glibc's own
(``GAPCACHE_MALLOC=default``), alternating, best of ``--repeats``.

Usage::

    python benchmarks/bench_analysis_phases.py STORE [--jobs 2] [--repeats 2] [--metrics geometry,rank]
    gapcache demo --out /tmp/demo && python benchmarks/bench_analysis_phases.py /tmp/demo/store.zarr

Prints per setting: the child's wall seconds, its user and system CPU seconds (``os.wait4``: with the worker
processes it started and waited for), and each metric's seconds from the summary's ``timing_s``; then the ratio
of each to the other setting.  The machine's load (/proc/loadavg) is printed beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"gapcache": {}, "glibc": {"GAPCACHE_MALLOC": "default"}}


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run_once(store: str, out: Path, env_extra: dict, jobs: int, metrics: str | None) -> dict:
    """One child `gapcache analyze`: {'wall', 'user', 'sys', 'timing': {metric: s}, 'load'}."""
    cmd = [sys.executable, "-m", "gapcache.cli", "analyze", store, "--out", str(out), "--jobs", str(jobs)]
    cmd += ["--metrics", metrics] if metrics else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gapcache analyze failed ({' '.join(cmd)}):\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    timing = next(iter(summary["stores"].values()))["timing_s"]
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "timing": timing, "load": before}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--metrics", default=None, help="comma-separated metrics (default: all)")
    args = ap.parse_args(argv)
    if not Path(args.store).exists():
        raise SystemExit(f"The 'store' argument of bench_analysis_phases must be a store path. Got {args.store!r}, "
                         f"which does not exist; make one with `gapcache demo --out DIR` (DIR/store.zarr).")
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in SETTINGS.items():
                got = run_once(args.store, Path(tmp) / f"{name}{r}", extra, args.jobs, args.metrics)
                print(f"{name:9s} run {r}: wall {got['wall']:6.2f} s  user {got['user']:6.2f}  sys {got['sys']:5.2f}  "
                      f"load {got['load']}", flush=True)
                if name not in best or got["wall"] < best[name]["wall"]:
                    best[name] = got
    a, b = best["gapcache"], best["glibc"]
    print(f"\nbest of {args.repeats}        {'gapcache':>9s} {'glibc':>9s}  ratio")
    for key in ("wall", "user", "sys"):
        print(f"  {key:18s} {a[key]:9.2f} {b[key]:9.2f}  {a[key] / max(b[key], 1e-9):.2f}")
    for metric in a["timing"]:
        x, y = a["timing"][metric], b["timing"].get(metric, float("nan"))
        if max(x, y) >= 0.05:
            print(f"  {metric:18s} {x:9.2f} {y:9.2f}  {x / max(y, 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
