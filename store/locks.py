"""Per-shard writer locks: two tasks started on the same shard by mistake cannot both write it.

A lock is a file ``LOCKDIR/<condition>.shard<k>.lock`` holding who owns it (host, pid, Slurm job),
created whole: the owner is written to a private temporary file that is then hard-linked to the
lock's name (``link`` fails if the name exists, atomically, NFS included), so no lock is ever seen
empty and a task killed while taking a lock leaves at most its temporary file. A lock left by a dead
owner is taken over: same host and the pid is gone, or the same Slurm job (a requeued task after
preemption); so is a lock without a readable owner (left by versions that created the file first
and wrote the owner after). Otherwise acquiring it raises
StoreLockedError naming the owner and the file to delete if that owner is really gone. Locks are
released when the task ends (``with ShardLocks(dir) as locks``), after its writes are flushed.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from gapcache.errors import StoreLockedError


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID", ""), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID", "")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: dict, me: dict) -> bool:
    if owner.get("job") and owner.get("job") == me["job"] and owner.get("array_task") == me["array_task"]:
        return True  # the same (requeued) Slurm task
    return owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))


def _owner(path: Path) -> dict | None:
    """The lock's owner; {} when the file is empty or unreadable, None when it is gone."""
    try:
        owner = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


class ShardLocks:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.held: list[Path] = []

    def acquire(self, name: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.lock"
        me = _me()
        tmp = self.dir / f".{name}.lock.{me['host']}.{me['pid']}.tmp"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)  # atomic: the lock appears with its owner in it, or not at all
                except FileExistsError:
                    owner = _owner(path)
                    if owner is None:  # released (or taken over) since: try again
                        continue
                    if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                        return
                    if not owner or _stale(owner, me):
                        path.unlink(missing_ok=True)
                        continue
                    raise StoreLockedError(
                        f"{name} is being written by another task (host {owner.get('host')}, pid {owner.get('pid')}, "
                        f"Slurm job {owner.get('job') or '-'}); lock file {path}. Two tasks must not write one shard. "
                        "If that task is dead, delete the lock file and rerun."
                    ) from None
                self.held.append(path)
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise StoreLockedError(f"Could not take the lock {path} after removing a stale one.")

    def release(self) -> None:
        for path in self.held:
            path.unlink(missing_ok=True)
        self.held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
