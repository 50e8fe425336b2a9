"""A throwaway one-node Slurm cluster for tests: munged + slurmctld + slurmd, run as root.

Usage::

    with SlurmCluster(tmp_dir) as cluster:      # starts the daemons, waits for the node to be idle
        env = cluster.env()                     # SLURM_CONF for sbatch / squeue / scontrol
        ...

Everything lives under ``tmp_dir``: its own munge key and socket (``AuthInfo=socket=``), its own
state, spool, pid and log files, its own ports. No systemd, no cgroups (``proctrack/linuxproc``,
``task/none``, no accounting). Two partitions on the one node: ``cpu`` (default) and ``gpu``
(no GRES: the node has no GPU, so jobs must not ask for ``--gres``). ``stop()`` ends only the
daemons this object started, by PID.

Needs Debian's ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs them) and root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_ports

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root, *, start_timeout: float = 30.0):
        self.root = Path(root)
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            env.pop(key)  # a test run inside a Slurm job must not leak its job's variables
        return env

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmError("the test cluster runs its daemons as root; not root")
        missing = missing_programs()
        if missing:
            raise SlurmError(f"programs missing: {missing} (apt-get install slurmctld slurmd slurm-client munge)")
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        self._check([_which("mungekey"), "-c", "-f", "-k", str(key)], "mungekey")
        self.munge_socket = r / "munge" / "munge.socket"
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={r / 'run' / 'munged.pid'}",
                               f"--seed-file={r / 'munge' / 'seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged socket")
        self.write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, "node idle")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # ------------------------------------------------------------------ config
    def write_conf(self) -> None:
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node_line = next(line for line in out.splitlines() if line.startswith("NodeName="))
        self.node = re.match(r"NodeName=(\S+)", node_line).group(1)
        # leave the node some memory headroom so RealMemory checks never drain it
        node_line = re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={int(m.group(1)) * 9 // 10}", node_line)
        host = socket.gethostname()
        ctld_port, d_port = free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
# gapcache test cluster (tests/slurm_cluster.py)
ClusterName=gapcachetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ helpers
    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(), timeout=60)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def _node_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return res.returncode == 0 and "idle" in res.stdout

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _check(self, cmd, what) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmError(f"{what} failed: {res.stderr.strip()}")

    def _wait(self, ok, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                     + self.logs())
            if ok():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {self.start_timeout:.0f} s waiting for {what}:\n" + self.logs())

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_jobs(self, job_ids, timeout: float = 300.0, poll: float = 1.0) -> dict:
        """Wait until none of the jobs (array ids included) is pending or running; their final states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_ids)
            if states and all(s not in ACTIVE for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise SlurmError(f"jobs {job_ids} still active after {timeout:.0f} s: {states}\n" + self.logs())
            time.sleep(poll)

    def job_states(self, job_ids) -> dict:
        states = {}
        for jid in job_ids:
            res = self.run("scontrol", "-o", "show", "job", str(jid), check=False)
            for line in res.stdout.splitlines():
                f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                key = f.get("JobId", jid)
                if f.get("ArrayTaskId"):
                    key = f"{f.get('ArrayJobId')}_{f['ArrayTaskId']}"
                states[key] = f.get("JobState", "?")
        return states


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
