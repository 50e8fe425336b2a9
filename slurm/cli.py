"""``gapcache slurm plan|submit|status``: registered into the main parser by ``register(subparsers)``.

    gapcache slurm plan   CONFIG [--out RUN] [--array-tasks N]   # write RUN/slurm/*.sbatch and print them
    gapcache slurm submit CONFIG [--out RUN] [--array-tasks N] [--force]
    gapcache slurm status RUN [--json]

RUN defaults to ``results/{model}/{dataset}/{name}`` (``slurm.results_dir``). Light at import
(no torch): the main CLI imports it to build its parser.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``slurm`` subcommand (each sub-subcommand sets ``func``) to the main CLI's subparsers."""
    p = subparsers.add_parser("slurm", help="Slurm jobs: extraction array + chained analysis (plan, submit, status)")
    sub = p.add_subparsers(dest="slurm_command", required=True)

    def common(q):
        q.add_argument("config", help="YAML config (its 'slurm' section sets partition, gres, cpus, mem, time, setup)")
        q.add_argument("--out", help="run directory (default: results/{model}/{dataset}/{name})")
        q.add_argument("--array-tasks", type=int, help="array size (overrides slurm.array_tasks; "
                                                       "default ceil(conditions x shards / slurm.shards_per_task))")

    plan = sub.add_parser("plan", help="write the sbatch scripts into RUN/slurm/ and print them; submits nothing")
    common(plan)
    plan.set_defaults(func=cmd_plan)

    submit = sub.add_parser("submit", help="write the scripts, sbatch them (analysis afterok the array), "
                                           "record the job ids in RUN/slurm/jobs.json")
    common(submit)
    submit.add_argument("--force", action="store_true", help="submit even if an earlier submission is still active")
    submit.add_argument("--sbatch", default="sbatch", help=argparse.SUPPRESS)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="progress from the store and the queue (scontrol)")
    status.add_argument("run", help="run directory given to plan/submit")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)


def cmd_plan(args) -> int:
    from gapcache.slurm.plan import format_plan, make_plan, write_plan

    plan = write_plan(make_plan(args.config, args.out, args.array_tasks))
    print(format_plan(plan), end="")
    return 0


def cmd_submit(args) -> int:
    from gapcache.slurm.plan import make_plan, submit_plan

    plan = make_plan(args.config, args.out, args.array_tasks)
    rec = submit_plan(plan, sbatch=args.sbatch, force=args.force)
    print(f"extraction array: job {rec['extract']['job_id']} ({plan.n_tasks} tasks)  {plan.extract_path}")
    if rec["analysis"]:
        print(f"analysis:         job {rec['analysis']['job_id']} ({rec['analysis']['dependency']})  {plan.analysis_path}")
    print(f"logs:             {plan.run_dir / 'logs'}/")
    print(f"recorded in:      {plan.slurm_dir / 'jobs.json'}")
    print(f"follow it with:   gapcache slurm status {plan.run_dir}")
    return 0


def cmd_status(args) -> int:
    from gapcache.slurm.plan import format_status, status

    st = status(args.run)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
