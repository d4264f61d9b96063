"""Stopping a daemon the tests started, by its pid and nothing else."""

from __future__ import annotations

import signal
import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `proc` if it still runs, then SIGKILL if it has not ended within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
