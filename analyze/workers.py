"""Independent CPU-bound jobs of one analysis (probe fits, figures) in this process and worker processes.

Usage::

    from gapcache.analyze import workers
    n = workers.resolve(p.jobs)                 # None: the CPUs this process may use; 1: in this process
    workers.warm(n)                             # start the n - 1 workers now, in the background (optional)
    workers.tune_malloc()                       # keep freed blocks of a few MB for reuse (glibc; see its docstring)
    out = workers.map_jobs(fn, jobs, n)         # [fn(*job) for job in jobs], in order
    running = workers.submit_jobs(fn, jobs, n)  # the workers start on them now; this process goes on meanwhile
    out = running.result()                      # ... then takes the jobs left, and waits for the workers'

Why processes: the probe refits and matplotlib are Python-heavy (GIL-bound: two threads ran the 12
probe jobs of a demo condition in 4.1 s against 4.6 s serially), so only processes use a second core.
``n`` processes share the jobs: this one and ``n - 1`` workers of loky's reusable pool (a dependency
through joblib and scikit-learn), each taking the next job when it is free. Loky's workers are fork + exec
and do not re-run the caller's ``__main__`` (a user's script without an ``if __name__ == '__main__'``
guard is safe, tested); they are reused between calls and live ``IDLE_TIMEOUT`` seconds without a job. BLAS
is limited to cpus // n threads in each worker, and here while the workers have jobs. Arguments travel
pickled (cloudpickle), results back the same way. A job's exception is raised here with its traceback, and
stops every process from taking more. Results are those of the serial loop (the jobs share no state; tested
summary for summary). With ``submit_jobs`` the workers run while this process does other work (the probes
run beside the metrics after them: ``gapcache.analyze.metrics.Pending``).
"""

from __future__ import annotations

import os
import sys
import threading

from gapcache.errors import ConfigError
from gapcache.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc  # noqa: F401 (workers.tune_malloc)


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


#: seconds an idle worker waits for a job before it exits (joblib's own default for its loky workers)
IDLE_TIMEOUT = 300


def _threads(n_jobs: int) -> int:
    """BLAS threads of each of ``n_jobs`` processes sharing this process's CPUs."""
    return max(available_cpus() // n_jobs, 1)


def _executor(n_workers: int, n_jobs: int):
    """The reusable loky pool of ``n_workers`` processes, BLAS limited to cpus // n_jobs threads each (the same
    settings every call, so the pool is reused, not restarted)."""
    from joblib.externals.loky import get_reusable_executor

    threads = str(_threads(n_jobs))
    env = {k: threads for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return get_reusable_executor(max_workers=n_workers, timeout=IDLE_TIMEOUT, env=env)


class Jobs:
    """The jobs of one :func:`submit_jobs` call, taken one at a time in order: by a feeder thread that keeps each
    of ``n_jobs - 1`` worker processes busy with one job from the moment they are submitted, and by this process
    once it calls :meth:`result`. The first error stops both from taking more."""

    def __init__(self, fn, jobs: list, n_jobs: int, desc: str | None = None):
        self.fn, self.jobs, self.n_jobs, self.desc = fn, jobs, n_jobs, desc
        self.results = [None] * len(jobs)
        self.error: BaseException | None = None
        self.bar = None
        self._next = 0
        self._lock = threading.Lock()
        self._feeder = None
        self._limits = None  # threadpoolctl's limits while workers run

    def start(self) -> "Jobs":
        if self.desc is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.jobs), desc=self.desc, file=sys.stderr, leave=False)
        if self.n_jobs > 1 and len(self.jobs) > 1:
            from threadpoolctl import threadpool_limits

            # BLAS here as in each worker until the jobs are done (2 OpenBLAS threads here beside a busy worker
            # on 2 cores: whole demo analysis 21-22 s and 37-40 CPU-s against 24-25 s and 43-44 CPU-s)
            self._limits = threadpool_limits(limits=_threads(self.n_jobs))
            n_workers = self.n_jobs - 1
            self._feeder = threading.Thread(target=self._feed, args=(_executor(n_workers, self.n_jobs), n_workers),
                                            name="gapcache-feed-workers", daemon=True)
            self._feeder.start()
        return self

    def _take(self) -> int | None:
        with self._lock:
            if self.error is not None or self._next >= len(self.jobs):
                return None
            self._next += 1
            return self._next - 1

    def _fail(self, err: BaseException):
        with self._lock:
            self.error = self.error or err

    def _done(self, i: int, value):
        self.results[i] = value
        if self.bar is not None:
            self.bar.update()

    def _feed(self, executor, n_workers: int):
        from concurrent.futures import FIRST_COMPLETED, wait

        pending = {}
        try:
            while True:
                while len(pending) < n_workers and (i := self._take()) is not None:
                    pending[executor.submit(self.fn, *self.jobs[i])] = i
                if not pending:
                    return
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    self._done(pending.pop(future), future.result())
        except BaseException as err:  # a job's own error (loky re-raises it with the worker's traceback)
            self._fail(err)
            wait(pending)  # nothing is left running behind this call

    def cancel(self):
        """Take no more jobs (those running finish); :meth:`result` raises then."""
        self._fail(RuntimeError("the jobs were cancelled"))
        self._end()

    def result(self) -> list:
        """[fn(*job) for job in jobs], in order: this process takes the jobs not taken yet, then waits for the
        workers'. From :meth:`start` until then, BLAS here is limited to cpus // n_jobs threads, as in each worker."""
        try:
            while (i := self._take()) is not None:
                self._done(i, self.fn(*self.jobs[i]))
        except BaseException as err:
            self._fail(err)
        self._end()
        if self.error is not None:
            raise self.error
        return self.results

    def _end(self):
        """Wait for the workers' jobs; BLAS threads and the progress bar as before :meth:`start`."""
        if self._feeder is not None:
            self._feeder.join()
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def submit_jobs(fn, jobs, n_jobs: int, desc: str | None = None) -> Jobs:
    """Start [fn(*job) for job in jobs] in ``n_jobs - 1`` worker processes now (when n_jobs > 1 and there is more
    than one job); ``.result()`` takes the rest here and returns them all, in order (with n_jobs 1: all here, then).
    ``desc``: a progress bar (stderr) counting finished jobs."""
    return Jobs(fn, list(jobs), n_jobs, desc).start()


def map_jobs(fn, jobs, n_jobs: int, desc: str | None = None) -> list:
    """[fn(*job) for job in jobs], in that order, in this process and ``n_jobs - 1`` workers (:func:`submit_jobs`)."""
    return submit_jobs(fn, jobs, n_jobs, desc).result()


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
    """Start the ``n_jobs - 1`` workers of :func:`map_jobs` and import ``modules`` there (``"mod:fn"``: and call
    ``fn``), in a background thread (the start costs ~1.5 s of imports per worker and matplotlib's first PNG and
    PDF ~0.5 s more, overlapped with the work before the first :func:`map_jobs`)."""
    if n_jobs <= 1:
        return None

    def run():
        executor = _executor(n_jobs - 1, n_jobs)
        for future in [executor.submit(_import, m) for _ in range(n_jobs - 1) for m in modules]:
            future.result()

    t = threading.Thread(target=run, name="gapcache-warm-workers", daemon=True)
    t.start()
    return t
