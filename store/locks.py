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
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from gapcache.errors import StoreLockedError

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ leftovers of dead writers
#: temporary files and directories are named with their owner, so a resume can tell a dead writer's from a live one's
def owner_tag() -> str:
    """``<pid>@<host>`` of this process, carried in the names of the temporary files it writes."""
    return f"{os.getpid()}@{socket.gethostname()}"


def tmp_name(name: str) -> str:
    """A hidden temporary file name beside ``name``, unique and carrying its owner: ``.NAME.PID@HOST.HEX.tmp``."""
    import uuid

    return f".{name}.{owner_tag()}.{uuid.uuid4().hex}.tmp"


_TAGGED = re.compile(r"\.(?P<pid>\d+)@(?P<host>[^/]+?)(\.[0-9a-f]{32})?\.tmp$")
_LOCK_TMP = re.compile(r"^\..+\.lock\.(?P<host>[^/]+)\.(?P<pid>\d+)\.tmp$")


def tmp_owner(name: str) -> dict | None:
    """{'host', 'pid'} of a temporary file or directory named by :func:`tmp_name` (or a lock's temporary
    file); None when the name carries no owner (written by a gapcache before names carried one)."""
    m = _LOCK_TMP.match(name) or _TAGGED.search(name)
    return {"host": m["host"], "pid": int(m["pid"])} if m else None


def owner_state(owner: dict | None) -> str:
    """'dead' (same host, pid gone; or this same requeued Slurm task), 'live' (same host, pid running),
    'elsewhere' (another host: cannot be told from here) or 'unknown' (no owner recorded)."""
    if not owner:
        return "unknown"
    me = _me()
    if _stale(owner, me):
        return "dead"
    return "live" if owner.get("host") == me["host"] else "elsewhere"


@dataclass
class Leftover:
    path: Path
    kind: str  # 'staged file' | 'creation directory' | 'lock'
    state: str  # see owner_state
    nbytes: int


def _size(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        return p.stat().st_size
    except OSError:
        return 0


def leftovers(run_dir, store_path=None) -> list[Leftover]:
    """What interrupted writers left in a run directory: staged ``.*.tmp`` files inside the store, the
    ``.store.zarr.*.tmp`` directory of an interrupted creation beside it, lock files and their temporary
    files in ``locks/``. Each with the state of its owner."""
    run = Path(run_dir)
    store = Path(store_path) if store_path is not None else run / "store.zarr"
    found: list[Leftover] = []
    if store.is_dir():
        for dirpath, _dirs, files in os.walk(store):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    p = Path(dirpath) / name
                    found.append(Leftover(p, "staged file", owner_state(tmp_owner(name)), _size(p)))
    if run.is_dir():
        for p in run.glob(f".{store.name}.*.tmp"):
            m = re.match(rf"^\.{re.escape(store.name)}\.(?P<pid>\d+)(@(?P<host>.+))?\.tmp$", p.name)
            owner = {"host": m["host"], "pid": int(m["pid"])} if m and m["host"] else None
            found.append(Leftover(p, "creation directory", owner_state(owner), _size(p)))
        locks = run / "locks"
        if locks.is_dir():
            for p in sorted(locks.iterdir()):
                if p.name.endswith(".lock"):
                    owner = _owner(p)
                    state = "dead" if owner == {} else owner_state(owner)  # unreadable: acquire takes it over
                    found.append(Leftover(p, "lock", state, _size(p)))
                elif p.name.endswith(".tmp"):
                    found.append(Leftover(p, "lock", owner_state(tmp_owner(p.name)), _size(p)))
    return found


def clean_leftovers(run_dir, store_path=None) -> list[Leftover]:
    """Remove the leftovers of dead writers (never a live or another host's writer's); return them."""
    import shutil

    removed = []
    for f in leftovers(run_dir, store_path):
        if f.state != "dead":
            continue
        try:
            if f.path.is_dir():
                shutil.rmtree(f.path)
            else:
                f.path.unlink()
        except FileNotFoundError:
            pass
        removed.append(f)
    if removed:
        log.info("removed %d leftover(s) of dead writers (%.1f MB)", len(removed),
                 sum(f.nbytes for f in removed) / 1e6)
    return removed


def describe_leftovers(found: list[Leftover]) -> list[str]:
    """One line per (kind, owner state): how many, how large, and what to do."""
    groups: dict[tuple[str, str], list[Leftover]] = {}
    for f in found:
        groups.setdefault((f.kind, f.state), []).append(f)
    why = {"dead": "of dead writers: a resume (`gapcache extract` with the same --out) removes them",
           "live": "of a writer running now on this host: leave them",
           "elsewhere": "of writers on another host: removed by a resume on that host once they are dead",
           "unknown": "with no owner recorded (an older gapcache): delete them when no writer runs"}
    return [f"{len(v)} leftover {kind}(s) ({sum(f.nbytes for f in v) / 1e6:.1f} MB) {why[state]}, e.g. {v[0].path}"
            for (kind, state), v in sorted(groups.items())]
