"""Independent CPU-bound jobs of one analysis (probe fits, figures) in worker processes.

Usage::

    from gapcache.analyze import workers
    n = workers.resolve(p.jobs)                 # None: the CPUs this process may use; 1: in this process
    workers.warm(n)                             # start the workers now, in the background (optional)
    workers.tune_malloc()                       # keep freed blocks of a few MB for reuse (glibc; see its docstring)
    out = workers.map_jobs(fn, jobs, n)         # [fn(*job) for job in jobs], in order

Why processes: the probe refits and matplotlib are Python-heavy (GIL-bound: two threads ran the 12
probe jobs of a demo condition in 4.1 s against 4.6 s serially), so only processes use a second core.
The pool is ``joblib.Parallel(backend='loky')`` (a dependency through scikit-learn): fork + exec
workers that do not re-run the caller's ``__main__`` (a user's script without an
``if __name__ == '__main__'`` guard is safe, tested), reused between calls, numpy arrays over 1 MB
passed as memory maps, and BLAS limited to cpus / n_jobs threads per worker.  A job's exception is
raised here with its traceback.  Results are those of the serial loop (the jobs share no state; tested
summary for summary).
"""

from __future__ import annotations

import os
import sys
import threading

from gapcache.errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm allocation, ``taskset``), else ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(jobs) -> int:
    """The number of worker processes for ``jobs`` (AnalysisParams.jobs / --jobs): None -> available CPUs."""
    if jobs is None:
        return available_cpus()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"The 'jobs' parameter (--jobs) of analyze must be an integer >= 1 or None (the CPUs this "
                          f"process may use: {available_cpus()}). Got {jobs!r} instead.")
    return jobs


def _parallel(n_jobs: int):
    from joblib import Parallel

    return Parallel(n_jobs=n_jobs, backend="loky", max_nbytes="1M", return_as="generator")


def map_jobs(fn, jobs, n_jobs: int, desc: str | None = None) -> list:
    """[fn(*job) for job in jobs], in that order; in ``n_jobs`` worker processes when n_jobs > 1 and there is
    more than one job, else in this process.  ``desc``: a progress bar (stderr) counting finished jobs."""
    jobs = list(jobs)
    if n_jobs <= 1 or len(jobs) <= 1:
        results = (fn(*job) for job in jobs)
    else:
        from joblib import delayed

        results = _parallel(n_jobs)(delayed(fn)(*job) for job in jobs)  # one pool size per run: no resize
    if desc is not None:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(jobs), desc=desc, file=sys.stderr, leave=False)
    return list(results)


#: glibc malloc settings of an analysis process and its workers (bytes): blocks below MMAP_THRESHOLD come from the
#: heap and up to TRIM_THRESHOLD of freed heap is kept for the next ones
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


def tune_malloc() -> bool:
    """Keep glibc from handing every freed block of a few MB back to the kernel (and faulting it in again, page by
    page, on the next allocation): ``mallopt`` here, and the same settings in the environment for the worker
    processes started after this.  The analysis allocates such blocks by the thousand (a padded group of token
    rows, a decoded shard layer): ``benchmarks/bench_analysis_phases.py STORE --metrics geometry`` on the demo
    store, best of 3 side by side: geometry 4.35 s against 5.78 s with glibc's own settings, the process's
    system CPU 1.35 s against 4.26 s (the whole analysis: 2.7 s against 3.7 s).  Costs at most
    TRIM_THRESHOLD of freed memory kept per malloc arena.  Skipped (False) off glibc, when the environment sets
    either variable already (the user's choice stands), or with ``GAPCACHE_MALLOC=default`` (glibc's own)."""
    import ctypes
    import ctypes.util

    if (any(k in os.environ for k in _MALLOC_ENV) or os.environ.get("GAPCACHE_MALLOC") == "default"
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return False
    os.environ.update({k: str(v) for k, v in _MALLOC_ENV.items()})  # workers start with them (glibc reads them then)
    return True


def _import(module: str) -> int:
    """Import ``module``; ``"pkg.mod:fn"`` also calls ``pkg.mod.fn()`` (a warm-up)."""
    import importlib

    module, _, fn = module.partition(":")
    mod = importlib.import_module(module)
    if fn:
        getattr(mod, fn)()
    return os.getpid()


WARM = ("gapcache.analyze.probe_stats", "gapcache.analyze.report:warm_up")


def warm(n_jobs: int, modules=WARM) -> threading.Thread | None:
    """Start the ``n_jobs`` workers and import ``modules`` there (``"mod:fn"``: and call ``fn``), in a background
    thread (the start costs ~1.5 s of imports per worker and matplotlib's first PNG and PDF ~0.5 s more,
    overlapped with the work before the first :func:`map_jobs`)."""
    if n_jobs <= 1:
        return None

    def run():
        map_jobs(_import, [(m,) for m in modules for _ in range(n_jobs)], n_jobs)

    t = threading.Thread(target=run, name="gapcache-warm-workers", daemon=True)
    t.start()
    return t
