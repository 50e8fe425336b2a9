"""Slurm jobs from a config: an extraction array on the GPU partition, an analysis job chained after it.

Usage::

    gapcache slurm plan   configs/qwen3-vl-30b-a3b.yaml [--out RUN] [--array-tasks N]   # write + print scripts
    gapcache slurm submit configs/qwen3-vl-30b-a3b.yaml [--out RUN]                     # sbatch them
    gapcache slurm status RUN                                                            # store + queue

or from Python: ``p = make_plan(load_config(path), out); write_plan(p); submit_plan(p)``.

The run directory (``--out``; default ``results/{model}/{dataset}/{name}`` from ``slurm.results_dir``)::

    RUN/store.zarr            the store all array tasks write (shards are the unit of work)
    RUN/analysis/             summary.json, report.html, figures (the chained CPU job)
    RUN/logs/                 %x_%A_%a.out per array task, %x_%j.out for the analysis job
    RUN/locks/                per-shard writer locks
    RUN/slurm/config.yaml     the config snapshot the jobs run (editing the original changes nothing)
    RUN/slurm/extract.sbatch  plain sbatch scripts: read them, edit them, submit them by hand
    RUN/slurm/analyze.sbatch
    RUN/slurm/jobs.json       job ids of every `gapcache slurm submit`, newest last

Array size: ``slurm.array_tasks`` if set; otherwise ceil(units / ``slurm.shards_per_task``) where
units = conditions x shards, conditions = the expanded condition list (truncated: one per strategy
and layer) and shards = ceil(samples / ``extract.samples_per_shard``). Counting samples loads the
dataset's index (no model, no images beyond what the loader reads); set ``slurm.array_tasks``
to skip it. Task i takes units i, i+N, i+2N, ... (``Extraction.units``), whole shards, so tasks
never share a shard; a rerun or a requeued task skips the shards already flagged done.

Preemption / time limit: ``--requeue`` and ``--signal=B:USR1@{signal_seconds}``. The batch shell
runs gapcache in the background and traps USR1: it stops gapcache (a shard is written to a
temporary file and renamed, status flags last: nothing torn), requeues its own array task with
``scontrol requeue`` (up to ``slurm.max_requeues`` restarts) and exits. The requeued task keeps
its job id, so it takes over its own stale shard locks and resumes. A task preempted by Slurm
(PreemptMode=REQUEUE) is requeued by Slurm itself, thanks to ``--requeue``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gapcache.errors import ConfigError, GapcacheError, SlurmError
from gapcache.store.schema import STORE_NAME

SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass
class Plan:
    cfg: object
    run_dir: Path
    n_tasks: int
    units: dict | None  # {"conditions", "samples", "shards", "units"} or None when not counted
    gapcache: str
    workdir: Path
    extract_script: str = ""
    analysis_script: str | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / SLURM_DIR

    @property
    def config_path(self) -> Path:
        return self.slurm_dir / "config.yaml"

    @property
    def extract_path(self) -> Path:
        return self.slurm_dir / "extract.sbatch"

    @property
    def analysis_path(self) -> Path:
        return self.slurm_dir / "analyze.sbatch"

    def submit_commands(self) -> list[str]:
        cmds = [f"jobid=$(sbatch --parsable {shlex.quote(str(self.extract_path))})"]
        if self.analysis_script is not None:
            cmds.append(f"sbatch --parsable --dependency=afterok:${{jobid%%;*}} --kill-on-invalid-dep=yes "
                        f"{shlex.quote(str(self.analysis_path))}")
        return cmds


# ---------------------------------------------------------------------------------------------- planning
def _slug(text: str) -> str:
    text = str(text).split(":", 1)[-1].rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def default_run_dir(cfg) -> Path:
    """``{slurm.results_dir}/{model}/{dataset}/{name}``: the seed work's results layout."""
    return Path(cfg.slurm.results_dir) / _slug(cfg.model.id) / _slug(cfg.data.dataset) / _slug(cfg.name)


def count_units(cfg) -> dict:
    """Conditions x shards of a config, from the config and the dataset's sample count (no model)."""
    from gapcache.conditions import expand_config

    e, d = cfg.extract, cfg.data
    n_cond = len(expand_config(e))
    try:
        from gapcache.extract import data as data_mod

        n_samples = len(data_mod.load_dataset(d.dataset, split=d.split, limit=d.limit, path=d.path, **d.options))
    except GapcacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader trouble: say how to avoid counting
        raise ConfigError(f"Could not count the samples of dataset {d.dataset!r} to size the job array ({err}). "
                          "Set 'slurm.array_tasks' (or pass --array-tasks) to choose the array size yourself.") from err
    n_shards = math.ceil(n_samples / e.samples_per_shard)
    return {"conditions": n_cond, "samples": n_samples, "shards": n_shards, "units": n_cond * n_shards}


def gapcache_command(cfg) -> str:
    """The gapcache command the jobs run: slurm.gapcache, else this installation's absolute path."""
    if cfg.slurm.gapcache:
        return cfg.slurm.gapcache
    exe = Path(sys.executable)
    if not exe.is_absolute():
        exe = Path.cwd() / exe
    script = exe.parent / "gapcache"  # venv python is a symlink: keep its directory, do not resolve it
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(str(exe))} -m gapcache.cli"


def make_plan(cfg, out=None, array_tasks: int | None = None, workdir=None) -> Plan:
    """The jobs of ``cfg`` for run directory ``out`` (default: ``default_run_dir``); nothing written."""
    from gapcache.config import load_config

    cfg = load_config(cfg)
    s = cfg.slurm
    if array_tasks is not None and not (isinstance(array_tasks, int) and array_tasks > 0):
        raise ConfigError(f"The 'array_tasks' parameter must be a positive int. Got {array_tasks!r} instead.")
    n = array_tasks or s.array_tasks
    units = None
    if n is None:
        units = count_units(cfg)
        n = max(1, math.ceil(units["units"] / s.shards_per_task))
    workdir = Path(workdir or Path.cwd()).absolute()
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    run_dir = (run_dir if run_dir.is_absolute() else workdir / run_dir).absolute()
    plan = Plan(cfg=cfg, run_dir=run_dir, n_tasks=int(n), units=units, gapcache=gapcache_command(cfg), workdir=workdir)
    plan.extract_script = extract_script(plan)
    plan.analysis_script = analysis_script(plan) if s.analysis else None
    return plan


def _q(path) -> str:
    return shlex.quote(str(path))


def _opt(name: str, value) -> list[str]:
    return [] if value is None else [f"#SBATCH --{name}={value}"]


def _setup_lines(s) -> list[str]:
    lines = ["# threads for torch / numpy / BLAS: the CPUs Slurm gave this job",
             "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} MKL_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    if s.setup:
        lines += ["", "# setup (slurm.setup)"] + list(s.setup)
    return lines


def extract_script(plan: Plan) -> str:
    cfg, s, n = plan.cfg, plan.cfg.slurm, plan.n_tasks
    run, logs = plan.run_dir, plan.run_dir / "logs"
    if plan.units:
        u = plan.units
        what = (f"# {n} array task(s) over {u['units']} (condition, shard) unit(s): {u['conditions']} condition(s) x "
                f"{u['shards']} shard(s) of <= {cfg.extract.samples_per_shard} samples ({u['samples']} samples).")
    else:
        what = f"# {n} array task(s) (slurm.array_tasks); units = conditions x shards were not counted."
    array = f"0-{n - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# gapcache extraction array of run {cfg.name!r}, written by `gapcache slurm plan` at {plan.created}.",
        what,
        f"# Task i extracts units i, i+{n}, i+{2 * n}, ... (whole shards) into {run / STORE_NAME};",
        "# rerunning or requeueing a task resumes it (shards flagged done are skipped).",
        f"# Submit: sbatch --parsable {run / SLURM_DIR / 'extract.sbatch'}   (or: gapcache slurm submit)",
        f"#SBATCH --job-name=gapcache-{_slug(cfg.name)}-extract",
        f"#SBATCH --array={array}",
        *_opt("partition", s.partition),
        *_opt("account", s.account),
        *_opt("gres", s.gpus),
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        *_opt("mem", s.mem),
        *_opt("time", s.time),
        f"#SBATCH --chdir={plan.workdir}",
        f"#SBATCH --output={logs}/%x_%A_%a.out",
        "#SBATCH --open-mode=append",
    ]
    if s.requeue:
        lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{s.signal_seconds}"]
    else:
        lines += ["#SBATCH --no-requeue"]
    lines += [x if x.startswith("#SBATCH") else f"#SBATCH {x}" for x in s.extra_sbatch]
    lines += ["", "set -uo pipefail", *_setup_lines(s), ""]
    task = '"${SLURM_ARRAY_TASK_ID:?run this script with sbatch}"'
    lines += [
        f'echo "gapcache: array task ${{SLURM_ARRAY_TASK_ID:-?}} of {n} (job ${{SLURM_ARRAY_JOB_ID:-?}}, '
        'restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date -Is)"',
    ]
    cmd = f"{plan.gapcache} extract {_q(plan.config_path)} --out {_q(run)} --task-index {task} --n-tasks {n}"
    if s.requeue:
        lines += [
            "",
            f"# Slurm sends USR1 to this shell {s.signal_seconds} s before the time limit: stop gapcache and requeue",
            "# this array task; it resumes where it stopped (its own stale shard locks are taken over).",
            "child=",
            "on_signal() {",
            '    echo "gapcache: USR1 at $(date -Is): stopping extraction" >&2',
            '    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"',
            f'    if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {s.max_requeues} ]; then',
            '        echo "gapcache: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" >&2',
            '        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && exit 0',
            "    fi",
            f'    echo "gapcache: not requeued (restart ${{SLURM_RESTART_COUNT:-0}}, slurm.max_requeues {s.max_requeues})" >&2',
            "    exit 1",
            "}",
            "trap on_signal USR1",
            "",
            f"{cmd} &",
            "child=$!",
            'wait "$child"',
            "rc=$?",
            'echo "gapcache: extraction exited with $rc at $(date -Is)"',
            "exit $rc",
        ]
    else:
        lines += [cmd]
    return "\n".join(lines) + "\n"


def analysis_script(plan: Plan) -> str:
    cfg, s = plan.cfg, plan.cfg.slurm
    run = plan.run_dir
    store, out = run / STORE_NAME, run / "analysis"
    args = " ".join(_q(a) for a in s.analysis_args)
    lines = [
        "#!/bin/bash",
        f"# gapcache analysis of run {cfg.name!r} (CPU tier), written by `gapcache slurm plan` at {plan.created}.",
        "# Chained after the extraction array; submit by hand with:",
        f"#   sbatch --parsable --dependency=afterok:ARRAY_JOB_ID {run / SLURM_DIR / 'analyze.sbatch'}",
        f"#SBATCH --job-name=gapcache-{_slug(cfg.name)}-analyze",
        *_opt("partition", s.analysis_partition),
        *_opt("account", s.account),
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={s.analysis_cpus}",
        *_opt("mem", s.analysis_mem),
        *_opt("time", s.analysis_time),
        f"#SBATCH --chdir={plan.workdir}",
        f"#SBATCH --output={run / 'logs'}/%x_%j.out",
        "#SBATCH --kill-on-invalid-dep=yes",
        *[x if x.startswith("#SBATCH") else f"#SBATCH {x}" for x in s.analysis_extra_sbatch],
        "",
        "set -euo pipefail",
        *_setup_lines(s),
        "",
        'echo "gapcache: analysis on $(hostname) at $(date -Is)"',
        f"{plan.gapcache} info {_q(store)}",
        f"{plan.gapcache} analyze {_q(store)} --out {_q(out)} --scheduler {_q(s.analysis_scheduler)}"
        + (f" {args}" if args else ""),
    ]
    return "\n".join(lines) + "\n"


def write_plan(plan: Plan) -> Plan:
    """Write the config snapshot and the scripts; create the log directory (sbatch needs it)."""
    import yaml

    for d in (plan.slurm_dir, plan.run_dir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    snapshot = "# the config these jobs run, snapshotted by `gapcache slurm plan`\n" + yaml.safe_dump(
        plan.cfg.to_dict(), sort_keys=False)
    _write(plan.config_path, snapshot)
    _write(plan.extract_path, plan.extract_script, 0o755)
    if plan.analysis_script is not None:
        _write(plan.analysis_path, plan.analysis_script, 0o755)
    elif plan.analysis_path.exists():
        plan.analysis_path.unlink()
    return plan


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def format_plan(plan: Plan) -> str:
    parts = [f"# run directory: {plan.run_dir}", f"# ==> {plan.extract_path} <==", plan.extract_script]
    if plan.analysis_script is not None:
        parts += [f"# ==> {plan.analysis_path} <==", plan.analysis_script]
    if plan.n_tasks > 1000:
        parts.append(f"# WARNING: {plan.n_tasks} array tasks exceed Slurm's default MaxArraySize (1001): raise "
                     "slurm.shards_per_task or set slurm.array_tasks (each task loads the model once).")
    parts += ["# submit (what `gapcache slurm submit` runs):", *plan.submit_commands()]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- submitting
def _sbatch(args: list[str], sbatch: str = "sbatch") -> str:
    try:
        res = subprocess.run([sbatch, "--parsable", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"'{sbatch}' was not found: run `gapcache slurm submit` on a Slurm login node, or submit "
                         "the scripts written by `gapcache slurm plan` by hand.") from None
    if res.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    out = res.stdout.strip().splitlines()
    if not out:
        raise SlurmError(f"sbatch {' '.join(args)} printed no job id.")
    return out[-1].split(";")[0].strip()  # --parsable: "jobid[;cluster]"


def read_jobs(run_dir) -> dict:
    path = Path(run_dir) / SLURM_DIR / JOBS_FILE
    if not path.is_file():
        return {"submissions": []}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SlurmError(f"{path} is not valid JSON ({err}); move it away to submit again.") from None


def submit_plan(plan: Plan, sbatch: str = "sbatch", force: bool = False) -> dict:
    """Write the plan, sbatch the array then the chained analysis, record the ids in RUN/slurm/jobs.json."""
    jobs = read_jobs(plan.run_dir)
    if jobs["submissions"] and not force:
        active = {k: v for k, v in job_states(_ids(jobs["submissions"][-1])).items() if v["state"] in ACTIVE_STATES}
        if active:
            raise SlurmError(
                f"Jobs of an earlier submission to {plan.run_dir} are still queued or running: "
                f"{', '.join(k + ' ' + v['state'] for k, v in sorted(active.items()))}. Two arrays must not write one "
                "store; wait for them, scancel them, or pass --force.")
    write_plan(plan)
    array_id = _sbatch([str(plan.extract_path)], sbatch)
    record = {"submitted": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "workdir": str(plan.workdir), "config": str(plan.config_path),
              "extract": {"job_id": array_id, "n_tasks": plan.n_tasks, "script": str(plan.extract_path)},
              "analysis": None}
    jobs["submissions"].append(record)
    _write(plan.slurm_dir / JOBS_FILE, json.dumps(jobs, indent=2) + "\n")  # the array is recorded even if the next fails
    if plan.analysis_script is not None:
        aid = _sbatch([f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes", str(plan.analysis_path)], sbatch)
        record["analysis"] = {"job_id": aid, "dependency": f"afterok:{array_id}", "script": str(plan.analysis_path)}
        _write(plan.slurm_dir / JOBS_FILE, json.dumps(jobs, indent=2) + "\n")
    return record


def _ids(record: dict) -> list[str]:
    return [r["job_id"] for r in (record.get("extract"), record.get("analysis")) if r]


# ---------------------------------------------------------------------------------------------- status
def job_states(job_ids, scontrol: str = "scontrol") -> dict:
    """{job or array task: {state, exit_code, reason, run_time, node, name}} from ``scontrol -o show job``.

    Jobs slurmctld has forgotten (finished more than MinJobAge ago) are absent. sacct is not used."""
    out = {}
    for jid in job_ids:
        try:
            res = subprocess.run([scontrol, "-o", "show", "job", str(jid)], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise SlurmError(f"'{scontrol}' was not found: not on a Slurm node?") from None
        if res.returncode != 0:
            if "invalid job id" in (res.stderr + res.stdout).lower():
                continue  # finished more than MinJobAge ago
            raise SlurmError(f"scontrol show job {jid} failed ({res.returncode}): {res.stderr.strip()}")
        for line in res.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if not f.get("JobId"):
                continue
            key = f["JobId"]
            if f.get("ArrayJobId") and f.get("ArrayTaskId"):
                key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
            out[key] = {"name": f.get("JobName"), "state": f.get("JobState", "?"), "reason": f.get("Reason"),
                        "exit_code": f.get("ExitCode"), "run_time": f.get("RunTime"), "node": f.get("NodeList"),
                        "restarts": f.get("Restarts")}
    return out


def status(run_dir, scontrol: str = "scontrol") -> dict:
    run_dir = Path(run_dir).absolute()
    jobs = read_jobs(run_dir)
    latest = jobs["submissions"][-1] if jobs["submissions"] else None
    st = {"run_dir": str(run_dir), "submission": latest, "n_submissions": len(jobs["submissions"]),
          "store": None, "queue": {}, "queue_error": None,
          "analysis": {"summary": str(run_dir / "analysis" / "summary.json"),
                       "done": (run_dir / "analysis" / "summary.json").is_file()}}
    store = run_dir / STORE_NAME
    if (store / "zarr.json").is_file():
        try:
            from gapcache.store import info

            d = info(store, size=False)  # no walk over every shard file on each poll
            totals = {k: sum(c[k] for c in d["conditions"].values()) for k in ("done", "failed", "pending")}
            st["store"] = {"path": str(store), "complete": d["complete"], "n_samples": d["n_samples"],
                           "conditions": d["conditions"], **totals}
        except Exception as err:  # noqa: BLE001 - a store being created right now
            st["store"] = {"path": str(store), "error": f"{type(err).__name__}: {err}"}
    if latest:
        try:
            st["queue"] = job_states(_ids(latest), scontrol)
        except SlurmError as err:
            st["queue_error"] = str(err)
    return st


def format_status(st: dict) -> str:
    lines = [f"run        {st['run_dir']}"]
    sub = st["submission"]
    if sub:
        a = sub.get("analysis")
        lines.append(f"submitted  {sub['submitted']}: array job {sub['extract']['job_id']} "
                     f"({sub['extract']['n_tasks']} tasks)" + (f", analysis job {a['job_id']} ({a['dependency']})" if a else "")
                     + (f"  [submission {st['n_submissions']}]" if st["n_submissions"] > 1 else ""))
    else:
        lines.append("submitted  never (no slurm/jobs.json; `gapcache slurm submit` records it)")
    s = st["store"]
    if s is None:
        lines.append("store      not created yet")
    elif "error" in s:
        lines.append(f"store      {s['path']}: unreadable right now ({s['error']})")
    else:
        total = s["done"] + s["failed"] + s["pending"]
        pct = 100.0 * (s["done"] + s["failed"]) / total if total else 100.0
        lines.append(f"store      {s['path']}: {s['done']} done, {s['failed']} failed, {s['pending']} pending "
                     f"of {total} ({pct:.0f}%), complete: {'yes' if s['complete'] else 'no'}")
        for label, c in s["conditions"].items():
            lines.append(f"  {label:<24} done {c['done']:>6}  failed {c['failed']:>5}  pending {c['pending']:>6}")
    if sub:
        lines.append("queue")
        if st["queue_error"]:
            lines.append(f"  {st['queue_error']}")
        for jid in _ids(sub):
            if not any(k == jid or k.startswith(f"{jid}_") for k in st["queue"]):
                lines.append(f"  {jid:<12} not known to slurmctld (finished more than MinJobAge ago, or purged)")
        for key, j in sorted(st["queue"].items(), key=lambda kv: _job_sort(kv[0])):
            extra = f" ({j['reason']})" if j.get("reason") and j["reason"] != "None" else ""
            restarts = f"  restarts {j['restarts']}" if j.get("restarts") not in (None, "0") else ""
            lines.append(f"  {key:<12} {j['name'] or '':<32} {j['state']:<10}{extra}  exit {j['exit_code']}  "
                         f"time {j['run_time']}  node {j['node']}{restarts}")
    a = st["analysis"]
    lines.append(f"analysis   {a['summary']}: {'written' if a['done'] else 'not yet'}")
    lines.append(f"logs       {Path(st['run_dir']) / 'logs'}/")
    return "\n".join(lines)


def _job_sort(key: str):
    head, _, task = key.partition("_")
    return (int(head) if head.isdigit() else 0, int(task) if task.isdigit() else -1, key)
