"""A one-node Slurm cluster for the tests: munged, slurmctld and slurmd started from a temporary folder.

Everything lives in that folder (slurm.conf, munge key and socket, state, spool, logs, pid files);
the node is this machine under the name `localhost` (127.0.0.1), without accounting, with
`proctrack/linuxproc` and `task/none` (no cgroups needed). The daemons run in the foreground as
children of the test process, and `stop()` cancels the cluster's jobs and then ends exactly those
three processes by pid. Clients (sbatch, squeue, scancel, Snakemake's Slurm plugin) find the
cluster through $SLURM_CONF, which `environ()` sets; inside a job they cannot (the Slurm plugin's job
step removes every SLURM_* variable but the job's id before it runs the rule's `srun ...`), so
/etc/slurm/slurm.conf, the clients' default, is a link to the cluster's file while it runs (on a
machine that has none: one with a Slurm of its own is left alone, and the tests skip).

Requires root (slurmd starts job steps as the submitting user) and the Debian packages
`slurm-wlm` and `munge`; `unavailable_reason()` says why not when one is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.procs import terminate

__all__ = ["SlurmCluster", "unavailable_reason", "NODE", "PARTITION"]

NODE = "localhost"  # the node's Slurm name: SLURM_NODELIST, hence Lightning's MASTER_ADDR
PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PREFIX = "xtra-slurm-"
CLIENTS = ("sbatch", "squeue", "srun", "scancel", "sinfo", "scontrol", "mungekey")


def unavailable_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the Slurm cluster tests need root (slurmd runs job steps as the submitting user)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"the Slurm cluster tests need the packages slurm-wlm and munge (missing: {', '.join(missing)})"
    if (SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink()) and not _is_ours(SYSTEM_CONF):
        return f"this machine has a Slurm configuration of its own ({SYSTEM_CONF}): the tests leave it alone"
    return None


def _is_ours(path: Path) -> bool:
    """A link left by a test cluster (possibly of an earlier, killed session)."""
    return path.is_symlink() and Path(os.readlink(path)).parent.name.startswith(PREFIX)


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """The node's memory for Slurm: the machine's, less 1 GB for everything else."""
    with open("/proc/meminfo") as handle:
        total_kb = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    return max(1024, total_kb // 1024 - 1024)


@dataclass
class SlurmCluster:
    """One node, one partition; `cpus` may exceed the machine's cores (config_overrides)."""

    cpus: int = max(2, os.cpu_count() or 1)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def environ(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def write_config(self) -> None:
        self.root.chmod(0o755)  # munged wants its socket's folder searchable by all
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=xtra-test",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge.socket'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'logs/slurmctld.log'}",
            f"SlurmdLogFile={r / 'logs/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the node as declared here, whatever the machine has
            "MinJobAge=300",  # finished jobs stay visible to squeue (the plugin's status query) 5 minutes
            "KillWait=5",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if _is_ours(SYSTEM_CONF):
            SYSTEM_CONF.unlink()
        SYSTEM_CONF.symlink_to(self.conf)  # fails if a configuration appeared meanwhile: never replaced

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.out", "ab")
        env = {**os.environ, **self.environ()}
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start the three daemons, wait for the node to be idle."""
        self.write_config()
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env={**os.environ, **self.environ()})
        key.chmod(0o600)
        self._start(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.root / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'logs/munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
        )
        self._wait(lambda: (self.root / "munge.socket").exists(), timeout, "munged's socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self._run("scontrol", "ping").stdout, timeout, "slurmctld to answer")
        self._start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(
            lambda: self._run("sinfo", "-h", "-N", "-o", "%t").stdout.strip() == "idle", timeout, "the node to be idle"
        )
        return self

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), capture_output=True, text=True, env={**os.environ, **self.environ()}, timeout=30
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"{dead[0]} exited with {self.procs[dead[0]].returncode} while waiting for {what}:\n{self.logs()}"
                )
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "logs").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def job_ids(self) -> list[str]:
        """Jobs that are pending or running (finished ones stay listed for MinJobAge)."""
        out = self._run("squeue", "-h", "-o", "%i", "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED").stdout
        return out.split()

    def all_job_ids(self) -> list[int]:
        """Jobs pending, running, or finished less than MinJobAge ago (ids count up from 1)."""
        return [int(i) for i in self._run("squeue", "-h", "-o", "%i", "-t", "all").stdout.split()]

    def stop(self, timeout: float = 30) -> None:
        """Cancel the jobs, wait for their steps to end, then end the three daemons by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self.job_ids()
            if ids:
                self._run("scancel", *ids)
            deadline = time.monotonic() + timeout
            while self.job_ids() and time.monotonic() < deadline:
                time.sleep(0.5)
        if _is_ours(SYSTEM_CONF) and Path(os.readlink(SYSTEM_CONF)) == self.conf:
            SYSTEM_CONF.unlink()
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is not None:
                terminate(proc, timeout)
        shutil.rmtree(self.root, ignore_errors=True)
