"""A two-node Ray cluster on 127.0.0.1 for the tests: `ray start --head` and a second `ray start --address`.

Both run with `--block`, as children of the test process in sessions of their own, so that
`stop()` ends exactly them (each `ray start --block` takes its raylet, workers and, on the head,
the GCS down with it; a process of theirs still alive after that is killed by pid). `ray stop` is
never used: it ends every Ray process of the machine, other people's too.

Addresses: the drivers reach the head at 127.0.0.1:<port>; Ray itself records a node given as
127.0.0.1 under the machine's own address (it resolves loopback away) and binds its servers on all
interfaces of this machine; nothing outside the machine is reached. Token authentication (Ray's
default for clusters) uses a token file of the cluster's own folder ($RAY_AUTH_TOKEN_PATH), not
the shared ~/.ray/auth_token that local Rays of other tests rewrite.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.cluster.procs import terminate

__all__ = ["RayCluster"]

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    """`cpus_per_node` CPUs on each of two nodes (the head and one joined to it)."""

    cpus_per_node: int = 1
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp")))  # short: sockets
    port: int = field(default_factory=_free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """For the nodes and every driver: the cluster's own token (not the shared ~/.ray/auth_token)."""
        return {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(self.root),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
        }

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.environ()},
            start_new_session=True,
        )
        log.close()

    def start(self, timeout: float = 180) -> RayCluster:
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        common = [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]
        self._start(
            "head", ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.root}", *common]
        )
        self._wait_for_log("head", timeout)
        self._start("worker", [f"--address={self.address}", *common])
        self._wait_for_log("worker", timeout)
        alive = self._alive_nodes()
        if alive != 2:
            raise RuntimeError(
                f"the Ray cluster at {self.address} has {alive} live node(s), expected 2:\n{self.logs()}"
            )
        return self

    def _alive_nodes(self) -> int:
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **self.environ()},
        )
        lines = proc.stdout.strip().splitlines()
        return int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0

    def _wait_for_log(self, node: str, timeout: float) -> None:
        """Until `ray start` of `node` says its runtime started (its raylet joined the cluster)."""
        deadline = time.monotonic() + timeout
        log = self.root / f"{node}.out"
        while time.monotonic() < deadline:
            if self.procs[node].poll() is not None:
                raise RuntimeError(f"`ray start` ({node}) exited {self.procs[node].returncode}:\n{self.logs()}")
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"`ray start` ({node}) did not start in {timeout:.0f} s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.root.glob("*.out"))
        )

    def task_workers(self, node: str, task_name: str) -> list[psutil.Process]:
        """Worker processes of `node` ('head' or 'worker') now running a task of that function name."""
        found = []
        for proc in psutil.Process(self.procs[node].pid).children(recursive=True):
            try:
                title = " ".join(proc.cmdline()).strip()  # Ray sets it to `ray::<function>` while a task runs
                if title == f"ray::{task_name}" or title.startswith(f"ray::{task_name} "):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self, timeout: float = 30) -> None:
        """End the worker node, then the head: SIGTERM to each `ray start --block`; any process they
        started (raylet, workers, GCS) still alive after that is killed by pid."""
        for name in ("worker", "head"):
            proc: subprocess.Popen | None = self.procs.get(name)
            if proc is None:
                continue
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            terminate(proc, timeout)
            _, alive = psutil.wait_procs(children, timeout=10)
            for child in alive:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
