"""Worker processes of one analysis (gapcache.analyze.workers): order, errors, the jobs parameter, and no
re-run of a guard-less ``__main__``."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gapcache.analyze import workers
from gapcache.errors import ConfigError


def _square_and_pid(x):
    return x * x, os.getpid()


def _fails(x):
    if x == 3:
        raise ValueError(f"job {x} failed")
    return x


def _slow_square_and_pid(x):
    time.sleep(0.2)
    return x * x, os.getpid()


def _mark_and_pid(path):
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def test_map_jobs_keeps_the_order_and_shares_the_jobs_between_this_process_and_the_workers():
    workers.warm(2).join()  # the worker is up: it takes jobs from the first
    got = workers.map_jobs(_slow_square_and_pid, [(x,) for x in range(8)], 2)
    assert [v for v, _ in got] == [x * x for x in range(8)]
    pids = {pid for _, pid in got}
    assert os.getpid() in pids and len(pids) == 2  # this process and one worker (n_jobs - 1)
    serial = workers.map_jobs(_slow_square_and_pid, [(x,) for x in range(3)], 1)
    assert {pid for _, pid in serial} == {os.getpid()}
    assert workers.map_jobs(_slow_square_and_pid, [(5,)], 2) == [(25, os.getpid())]  # one job: no pool
    assert workers.map_jobs(_slow_square_and_pid, [], 2) == []


def test_submitted_jobs_run_in_the_workers_before_result_is_called(tmp_path):
    marks = [tmp_path / f"job{i}" for i in range(3)]
    running = workers.submit_jobs(_mark_and_pid, [(str(m),) for m in marks], 2)
    deadline = time.monotonic() + 120
    while not marks[0].exists() and time.monotonic() < deadline:  # nothing here has taken a job yet
        time.sleep(0.05)
    assert marks[0].exists() and int(marks[0].read_text()) != os.getpid()
    got = running.result()
    assert got == [int(m.read_text()) for m in marks] and got[0] != os.getpid()


def test_cancelled_jobs_are_not_taken_and_result_says_so(tmp_path):
    running = workers.submit_jobs(_slow_square_and_pid, [(x,) for x in range(50)], 2)
    running.cancel()
    with pytest.raises(RuntimeError, match="the jobs were cancelled"):
        running.result()
    assert sum(r is not None for r in running.results) < 50


def test_a_failing_job_raises_its_own_error_here():
    with pytest.raises(ValueError, match="job 3 failed"):
        workers.map_jobs(_fails, [(x,) for x in range(5)], 2)


def test_resolve_takes_none_or_a_positive_integer():
    assert workers.resolve(None) == workers.available_cpus() >= 1
    assert workers.resolve(3) == 3
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match=r"The 'jobs' parameter \(--jobs\) of analyze must be an integer >= 1"):
            workers.resolve(bad)


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path):
    """multiprocessing's spawn re-imports the caller's __main__ in each worker; loky's workers do not."""
    script = tmp_path / "user_script.py"
    script.write_text("import os\n"
                      "print('TOP LEVEL', os.getpid(), flush=True)\n"
                      "from gapcache.analyze import workers\n"
                      "def f(x):\n"
                      "    return os.getpid()\n"
                      "print('PIDS', sorted(set(workers.map_jobs(f, [(i,) for i in range(6)], 2))), flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.count("TOP LEVEL") == 1, out
    assert "PIDS" in out


TUNE = """
import json, os, resource, numpy as np
from gapcache.analyze import workers
ok = workers.tune_malloc()
faults = []
for _ in range(30):  # three 4 MB blocks filled then freed, as a padded group of token rows and its copies
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [np.empty(1 << 19) for _ in range(3)]
    for x in xs:
        x.fill(1.0)
    del xs, x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"ok": ok, "env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
                  "faults": sorted(faults)[len(faults) // 2]}))
"""


def _tune(**env):
    import json

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GAPCACHE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", TUNE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_keeps_freed_blocks_for_reuse_and_passes_the_settings_to_workers():
    got = _tune()
    assert got["ok"] is True
    assert got["env"] == {"MALLOC_MMAP_THRESHOLD_": str(workers.MMAP_THRESHOLD),
                          "MALLOC_TRIM_THRESHOLD_": str(workers.TRIM_THRESHOLD)}
    assert got["faults"] < 100  # of its 3072 pages (glibc 2.x's own settings: ~1500, trimmed and faulted in again)


def test_tune_malloc_leaves_the_users_settings_and_glibcs_own_alone():
    assert _tune(GAPCACHE_MALLOC="default")["ok"] is False
    got = _tune(MALLOC_TRIM_THRESHOLD_="1000000")
    assert got["ok"] is False and got["env"] == {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": "1000000"}


def test_blas_here_runs_as_many_threads_as_in_a_worker_while_the_workers_run():
    from threadpoolctl import threadpool_info

    def threads():
        return [p["num_threads"] for p in threadpool_info()]

    before = threads()
    assert before, "numpy's BLAS is not seen by threadpoolctl"
    running = workers.submit_jobs(_slow_square_and_pid, [(x,) for x in range(3)], 2)
    during = threads()
    running.result()
    assert during == [max(workers.available_cpus() // 2, 1)] * len(before)
    assert threads() == before
