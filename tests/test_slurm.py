"""gapcache slurm: the generated scripts, submit/status with fake sbatch/scontrol, and (marked ``slurm``)
the real jobs on a one-node Slurm cluster started by the test (tests/slurm_cluster.py)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gapcache.config import DEMO, load_config
from gapcache.errors import ConfigError
from gapcache.slurm import plan as sp

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, SlurmError, missing_programs  # noqa: E402

SMALL = {
    "name": "slurmtest",
    "model": {"family": "llava", "id": "builtin:tiny-llava", "dtype": "float32"},
    "data": {"dataset": "synthetic", "split": "test", "options": {"n": 16, "image_size": 64, "seed": 0}},
    "extract": {"conditions": ["original", "blind_black"], "batch_size": 8, "samples_per_shard": 8, "max_length": 512},
    "slurm": {"partition": "gpu", "gpus": None, "cpus_per_task": 1, "mem": "2G", "time": "00:15:00",
              "array_tasks": 3, "analysis_partition": "cpu", "analysis_cpus": 1, "analysis_mem": "2G",
              "analysis_time": "00:15:00", "analysis_args": ["--n-resamples", "99"]},
}


def small(**slurm):
    d = copy.deepcopy(SMALL)
    d["slurm"].update(slurm)
    return load_config(d)


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ---------------------------------------------------------------------------------------------- scripts
def test_plan_scripts(tmp_path):
    p = sp.write_plan(sp.make_plan(small(), tmp_path / "run"))
    ex = p.extract_path.read_text()
    opts = sbatch_lines(ex)
    assert "#SBATCH --array=0-2" in opts
    assert "#SBATCH --partition=gpu" in opts and "#SBATCH --cpus-per-task=1" in opts
    assert not any("--gres" in o for o in opts)  # gpus: null omits it
    assert "#SBATCH --requeue" in opts and "#SBATCH --signal=B:USR1@120" in opts
    assert f"#SBATCH --output={tmp_path / 'run' / 'logs'}/%x_%A_%a.out" in opts
    assert "trap on_signal USR1" in ex and 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in ex
    # the venv's own gapcache, by absolute path; the config snapshot; the array split
    gapcache = Path(sys.executable).parent / "gapcache"
    assert f"{gapcache} extract {p.config_path} --out {tmp_path / 'run'} --task-index" in ex
    assert "--n-tasks 3 &" in ex
    assert load_config(p.config_path).hash() == small().hash()
    an = p.analysis_path.read_text()
    assert "#SBATCH --partition=cpu" in sbatch_lines(an) and "#SBATCH --kill-on-invalid-dep=yes" in sbatch_lines(an)
    assert f"analyze {tmp_path / 'run' / 'store.zarr'} --out {tmp_path / 'run' / 'analysis'} --scheduler threads " \
           "--n-resamples 99" in an
    assert (tmp_path / "run" / "logs").is_dir()
    assert os.access(p.extract_path, os.X_OK)
    assert "--dependency=afterok:" in sp.format_plan(p)


def test_plan_options_and_defaults(tmp_path, monkeypatch):
    cfg = small(gpus="gpu:a100:2", account="lab", max_parallel=2, mem=None, setup=["module load cuda/12.4"],
                extra_sbatch=["--exclusive", "#SBATCH --qos=high"], requeue=False, analysis=False,
                gapcache="gapcache")
    p = sp.make_plan(cfg, tmp_path / "r")
    opts = sbatch_lines(p.extract_script)
    assert {"#SBATCH --gres=gpu:a100:2", "#SBATCH --account=lab", "#SBATCH --array=0-2%2", "#SBATCH --exclusive",
            "#SBATCH --qos=high", "#SBATCH --no-requeue"} <= set(opts)
    assert not any(o.startswith("#SBATCH --mem") or "--signal" in o for o in opts)
    assert "module load cuda/12.4\n" in p.extract_script and "\ngapcache extract " in p.extract_script
    assert p.analysis_script is None
    # array size from the units: 2 conditions x 2 shards of 8 samples, 1 shard per task
    p = sp.make_plan(small(array_tasks=None), tmp_path / "r")
    assert (p.n_tasks, p.units) == (4, {"conditions": 2, "samples": 16, "shards": 2, "units": 4})
    assert sp.make_plan(small(array_tasks=None, shards_per_task=3), tmp_path / "r").n_tasks == 2
    assert sp.make_plan(small(), tmp_path / "r", array_tasks=5).n_tasks == 5
    # demo: 4 plain conditions + 2 strategies x 5 layers = 14 conditions x 6 shards of 32 samples
    assert sp.make_plan(DEMO, tmp_path / "d").units["units"] == 84
    # default run directory: results/{model}/{dataset}/{name}
    monkeypatch.chdir(tmp_path)
    assert sp.make_plan(small()).run_dir == tmp_path / "results" / "tiny-llava" / "synthetic" / "slurmtest"


def test_dask_jobqueue_workers_use_the_cpu_tier_resources():
    """--scheduler slurm: each worker job is sized by analysis_cpus/mem/time on the CPU partition, not by the
    GPU array's cpus_per_task / mem (the real SLURMCluster's job script; nothing is submitted)."""
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    from gapcache.analyze.scheduler import slurm_cluster

    cfg = small(cpus_per_task=8, mem="64G", analysis_cpus=3, analysis_mem="5G", analysis_time="00:20:00",
                setup=["module load python"])
    with slurm_cluster(cfg.slurm, SLURMCluster) as cluster:
        script = cluster.job_script()
    opts = sbatch_lines(script)
    assert {"#SBATCH -p cpu", "#SBATCH --cpus-per-task=3", "#SBATCH -t 00:20:00"} <= set(opts)
    assert "#SBATCH --mem=5G" in opts
    assert "--nthreads 3 " in script and "--nworkers" not in script and "module load python" in script


@pytest.mark.parametrize("key, value", [("cpus_per_task", 0), ("array_tasks", -1), ("gpus", ""), ("setup", "x"),
                                        ("requeue", "yes"), ("signal_seconds", 0), ("mem", "1G\n#SBATCH x")])
def test_slurm_config_validation(key, value):
    with pytest.raises(ConfigError, match=f"slurm.{key}"):
        small(**{key: value})


def _fake(tmp_path, name, body) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_submit_records_jobs_and_refuses_a_second_active_submission(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    sbatch = _fake(tmp_path, "sbatch", f'echo "$@" >> {calls}\nn=$(wc -l < {calls}); echo "$((100 + n));cl"\n')
    _fake(tmp_path, "scontrol", 'echo "JobId=$4 JobName=x JobState=RUNNING Reason=None ExitCode=0:0 RunTime=1 '
                                'NodeList=n1"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    p = sp.make_plan(small(), tmp_path / "run")
    rec = sp.submit_plan(p, sbatch=sbatch)
    assert rec["extract"]["job_id"] == "101" and rec["analysis"]["job_id"] == "102"
    lines = calls.read_text().splitlines()
    assert lines[0] == f"--parsable {p.extract_path}"
    assert lines[1] == f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {p.analysis_path}"
    jobs = json.loads((tmp_path / "run" / "slurm" / "jobs.json").read_text())
    assert jobs["submissions"][0]["extract"]["n_tasks"] == 3
    with pytest.raises(sp.SlurmError, match="still queued or running"):
        sp.submit_plan(p, sbatch=sbatch)
    st = sp.status(tmp_path / "run")
    assert st["store"] is None and st["queue"]["101"]["state"] == "RUNNING"
    text = sp.format_status(st)
    assert "store      not created yet" in text and "101" in text and "analysis job 102 (afterok:101)" in text


def test_cli_register():
    import argparse

    from gapcache.slurm.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["slurm", "submit", "c.yaml", "--out", "r", "--array-tasks", "4"])
    assert (args.command, args.slurm_command, args.array_tasks, args.func.__name__) == ("slurm", "submit", 4,
                                                                                       "cmd_submit")
    assert parser.parse_args(["slurm", "status", "r", "--json"]).func.__name__ == "cmd_status"


# ---------------------------------------------------------------------------------------------- real Slurm
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node cluster of our own; skipped without Slurm outside CI, a failure in CI."""
    missing = missing_programs()
    if missing or os.geteuid() != 0:
        why = (f"Slurm is not installed (missing {', '.join(missing)}; apt-get install -y --no-install-recommends "
               "slurmctld slurmd slurm-client munge)" if missing else "the test cluster's daemons must run as root")
        if _in_ci():
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="gapcache-slurm-", dir="/tmp"))  # short: the munge socket path
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except SlurmError as err:
        cluster.stop()
        pytest.fail(f"could not start the test Slurm cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("GAPCACHE_KEEP_SLURM"):  # keep the daemons' logs for debugging
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.integration
def test_real_slurm_array_then_analysis(slurm_cluster, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from gapcache.extract.models import resolve_model_path
    from gapcache.store import info

    resolve_model_path("builtin:tiny-llava", "llava")  # build the tiny checkpoint once, not in 3 racing tasks
    for key, value in slurm_cluster.env().items():
        if key == "SLURM_CONF" or key not in os.environ:
            monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    plan = sp.make_plan(small(), tmp_path / "run")
    rec = sp.submit_plan(plan)
    array_id, analysis_id = rec["extract"]["job_id"], rec["analysis"]["job_id"]
    st = sp.status(plan.run_dir)
    assert {k for k in st["queue"]} >= {analysis_id}
    states = slurm_cluster.wait_jobs([array_id, analysis_id], timeout=420)
    elapsed = time.monotonic() - t0
    logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((plan.run_dir / "logs").glob("*")))
    assert states == {f"{array_id}_{i}": "COMPLETED" for i in range(3)} | {analysis_id: "COMPLETED"}, \
        f"{states}\n{logs}\n{slurm_cluster.logs()}"
    d = info(plan.run_dir / "store.zarr")
    assert d["complete"] and all(c["done"] == 16 for c in d["conditions"].values()), d["conditions"]
    summary = json.loads((plan.run_dir / "analysis" / "summary.json").read_text())
    assert summary["stores"]
    # every task logged to RUN/logs/%x_%A_%a.out, the analysis to %x_%j.out
    names = {f.name for f in (plan.run_dir / "logs").iterdir()}
    assert {f"gapcache-slurmtest-extract_{array_id}_{i}.out" for i in range(3)} | \
           {f"gapcache-slurmtest-analyze_{analysis_id}.out"} <= names, names
    text = sp.format_status(sp.status(plan.run_dir))
    assert "complete: yes" in text and "summary.json: written" in text and f"{array_id}_2" in text
    print(f"\nreal Slurm: array of 3 + analysis done in {elapsed:.1f} s\n{text}")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.integration
def test_real_slurm_usr1_requeues_the_task_and_it_resumes(slurm_cluster, tmp_path, monkeypatch):
    """The time-limit warning (USR1 to the batch shell): gapcache stops, the task requeues itself, reruns, finishes."""
    pytest.importorskip("torch")
    from gapcache.extract.models import resolve_model_path
    from gapcache.store import info

    resolve_model_path("builtin:tiny-llava", "llava")
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    for key in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    plan = sp.make_plan(small(array_tasks=1), tmp_path / "run")
    rec = sp.submit_plan(plan)
    task, analysis_id = f"{rec['extract']['job_id']}_0", rec["analysis"]["job_id"]
    deadline = time.monotonic() + 120
    while slurm_cluster.job_states([task]).get(task) != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.job_states([task])
        time.sleep(0.2)
    log_dir = tmp_path / "run" / "logs"
    while not any("array task" in f.read_text() for f in log_dir.glob("*extract*.out")):  # trap installed next
        assert time.monotonic() < deadline, "the batch script never started"
        time.sleep(0.2)
    time.sleep(2)  # inside gapcache's start-up
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", task)
    # Slurm holds a requeued job back for the credential lifetime (the test cluster's cred_expire=10 s; 120 s
    # by default). Releasing it earlier (scontrol update StartTime=now) races the revoked credential of the
    # first run: "Killing non-startable batch job: Job credential revoked", and the task fails.
    while sp.job_states([task])[task]["restarts"] != "1":
        job = sp.job_states([task])[task]
        assert job["state"] in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED") and time.monotonic() < deadline, job
        time.sleep(0.2)
    states = slurm_cluster.wait_jobs([task, analysis_id], timeout=420)
    log = (plan.run_dir / "logs" / f"gapcache-slurmtest-extract_{rec['extract']['job_id']}_0.out").read_text()
    assert states == {task: "COMPLETED", analysis_id: "COMPLETED"}, f"{states}\n{log}\n{slurm_cluster.logs()}"
    assert f"requeueing {task}" in log and "restart 1)" in log, log
    assert info(plan.run_dir / "store.zarr")["complete"]
    assert (plan.run_dir / "analysis" / "summary.json").is_file()
    assert sp.status(plan.run_dir)["queue"][task]["restarts"] == "1"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.integration
def test_real_slurm_dask_jobqueue_workers_give_the_summary_of_local_threads(slurm_cluster, tmp_path, monkeypatch):
    """--scheduler slurm: the analysis graph runs on two dask-jobqueue worker jobs of the real cluster, and every
    estimate, CI and results array equals the local-threads analysis of the same store."""
    pytest.importorskip("dask_jobqueue")
    import xarray as xr

    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.scheduler import scheduler
    from gapcache.store import open_store
    from helpers import comparable_summary
    from test_distributed import analysis_store

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    for key in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # dask-jobqueue's worker logs land here
    store = analysis_store(tmp_path)
    p = AnalysisParams(n_resamples=199, n_splits=2)
    with scheduler("threads"):
        ref, ref_arrays = analyze_store(open_store(store), p)
    with scheduler("slurm", slurm=small().slurm) as client:
        got, got_arrays = analyze_store(open_store(store), p)
        workers = client.scheduler_info()["workers"]
        queue = slurm_cluster.run("squeue", "-h", "-o", "%j %T").stdout.split("\n")
    # the client has no local worker: the graph ran on the worker processes of the Slurm jobs
    assert type(client.cluster).__name__ == "SLURMCluster" and workers, workers
    assert "dask-worker RUNNING" in queue, queue
    assert "skipped" not in ref["metrics"]["probes"] and "cliff_layer" in ref["metrics"]["evd"]
    assert comparable_summary(got) == comparable_summary(ref)
    xr.testing.assert_identical(got_arrays.load(), ref_arrays.load())
