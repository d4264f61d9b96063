"""Jobs that meet their time limit: the scheduler's warning caught, a save at the next step boundary, an
exit the front-end retries, and the record of a job's attempts (docs/pipeline.md, "Time limits").

**The warning.** Slurm sends the signal of `sbatch --signal=USR1@N` (the cluster profiles set it:
workflow/rules/common.smk) to every process of the job's steps about N seconds before the time limit
(up to a minute earlier: slurmctld looks at time limits every 30 s); LSF sends the `bsub -wa USR1 -wt M`
signal M minutes before. At the limit itself both send SIGTERM (and so do `scancel` and `bkill`), then
SIGKILL. `catch_stop_signals()` makes SIGUSR1 and SIGTERM set a flag instead of ending the process (the
`xtra pretrain` command installs it before anything else, and every process it starts inherits or installs
it). The training loop (xtra.train.checkpoints.KeepCheckpoints) looks at the flag after every optimiser step
(`stop_signal()`), agree on it over their ranks (any rank's signal stops them all), save a resumable
state at that step and raise `StopForResubmission`, which the `xtra` command turns into exit status
`RESUBMIT_EXIT` (75, EX_TEMPFAIL): the front-end (Snakemake's `retries`) runs the job again, and it
resumes from that state. The step under way when the signal came is finished and saved: no optimiser
step is lost unless SIGKILL comes first (a lead time shorter than a step and a save).

**Attempts.** `AttemptLog` keeps one record per attempt of a job, beside its resumable state: the
progress (optimiser steps) it started from, where it stopped and why. When the
front-end runs a job again (Snakemake's attempt number, which the workflow's rules export as
`XTRA_ATTEMPT`), an attempt that would start where the previous one started, and that previous attempt
did not finish, made no progress: it stops with `NoProgressError` (exit 2) instead of being resubmitted
until the retries run out. A run started by hand (no `XTRA_ATTEMPT`, or 1) is never refused: it may
follow a fix.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from xtra.atomic import write_json_atomic
from xtra.errors import XtraError, writing_to

__all__ = [
    "STOP_SIGNALS",
    "RESUBMIT_EXIT",
    "ATTEMPT_ENV",
    "StopForResubmission",
    "NoProgressError",
    "catch_stop_signals",
    "release_stop_signals",
    "ignore_stop_signals",
    "stop_signal",
    "seconds_since_stop_signal",
    "front_end_attempt",
    "AttemptLog",
]

# SIGUSR1: the warning of the cluster profiles (Slurm --signal, LSF -wa); SIGTERM: the limit, scancel, bkill
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
RESUBMIT_EXIT = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, to be run again
ATTEMPT_ENV = "XTRA_ATTEMPT"  # the front-end's attempt number of this job (1, 2, ...)

_received: dict[str, float] = {}  # signal name -> monotonic time it first came


class StopForResubmission(BaseException):  # noqa: N818 - not an error: a request to run the job again
    """A stop signal came: the state is saved, the process ends with RESUBMIT_EXIT for the front-end to resubmit.

    A BaseException, like KeyboardInterrupt: the loops that retry a failed job (`except Exception`)
    must let it through, since the scheduler is about to end the whole job."""


class NoProgressError(XtraError):
    """A resubmitted job would start where its previous attempt started: that attempt made no progress."""


def _note(signum: int, frame: Any) -> None:
    _received.setdefault(signal.Signals(signum).name, time.monotonic())


def catch_stop_signals() -> None:
    """SIGUSR1 and SIGTERM set the stop flag instead of ending the process (main thread only; idempotent).

    Processes forked later (DataLoader workers) inherit the handler: they keep working until the main
    process stops them. A process started afresh (a spawned rank) calls this itself."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _note)


def release_stop_signals() -> None:
    """Give SIGUSR1 and SIGTERM their default action back (a job with nothing to save: they end it); one that
    already came is delivered again, so the process ends as it would have without `catch_stop_signals`."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if (received := stop_signal()) is not None:
            os.kill(os.getpid(), signal.Signals[received])


def ignore_stop_signals() -> None:
    """The command's work is done or saved: a warning or SIGTERM coming now changes nothing, so it is ignored
    until the process ends. (Otherwise Python, shutting down, gives the caught signals their default action
    back, and one coming in those last milliseconds ends a finished job with the signal's status: seen on
    Slurm, exit 138 after a run that had finished.)"""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def stop_signal() -> str | None:
    """The name of the first stop signal this process received (SIGUSR1, SIGTERM), or None."""
    return min(_received, key=_received.__getitem__) if _received else None


def seconds_since_stop_signal() -> float | None:
    return time.monotonic() - min(_received.values()) if _received else None


def front_end_attempt() -> int | None:
    """The front-end's attempt number of this job (`XTRA_ATTEMPT`), or None when it does not say."""
    value = os.environ.get(ATTEMPT_ENV, "").strip()
    return int(value) if value.isdigit() else None


class AttemptLog:
    """The attempts of one job: a JSON list beside its resumable state, rewritten atomically by rank 0.

    Each record: `attempt` (1, 2, ... of this state), `front_end_attempt`, `start` (the progress it
    resumed from, in `unit`s), and once it ends `end`, `outcome` (`finished`, `stopped` by a signal,
    `failed`) and the `signal`; a record without an outcome is an attempt that was killed."""

    def __init__(self, path: Path, unit: str, job: str) -> None:
        self.path, self.unit, self.job = Path(path), unit, job

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []  # a damaged record says nothing about progress; it is rewritten
        return records if isinstance(records, list) else []

    def check_progress(self, start: int) -> None:
        """NoProgressError when the front-end runs this job again and its previous attempt, which did not
        finish, started at `start` too. Read-only: every rank may call it before any rank begins."""
        attempt = front_end_attempt()
        records = self.records()
        if attempt is None or attempt < 2 or not records:
            return
        last = records[-1]
        if last.get("outcome") != "finished" and last.get("start") == start:
            how = (
                f"was stopped by {last.get('signal')}"
                if last.get("outcome") == "stopped"
                else "failed"
                if last.get("outcome") == "failed"
                else "was killed before it could record its end"
            )
            raise NoProgressError(
                f"{self.job}: no progress since the previous attempt: attempt {last.get('attempt')} started at "
                f"{self.unit} {start} and {how} without saving a later one; attempt {attempt} of the front-end "
                f"would start there again ({self.path}). Give the job more time (its resources.runtime) or look at the "
                f"previous attempt's log; a run started by hand is not refused."
            )

    def begin(self, start: int, **facts: Any) -> None:
        """Record a new attempt starting at `start` (rank 0)."""
        records = self.records()
        number = (records[-1].get("attempt", len(records)) if records else 0) + 1
        records.append({"attempt": number, "front_end_attempt": front_end_attempt(), "start": start, **facts})
        self._write(records)

    def end(self, outcome: str, end: int, **facts: Any) -> dict[str, Any]:
        """Record how the current attempt ended (rank 0); returns its record."""
        records = self.records() or [{"attempt": 1, "front_end_attempt": front_end_attempt(), "start": None}]
        records[-1].update({"outcome": outcome, "end": end, **facts})
        self._write(records)
        return records[-1]

    def history(self) -> list[str]:
        """One line per earlier attempt: where it started, where it stopped and why."""
        lines = []
        for r in self.records():
            how = r.get("outcome") or "killed (no record of its end)"
            if r.get("outcome") == "stopped":
                how = f"stopped by {r.get('signal')}, saved {self.unit} {r.get('end')}, lost {r.get('lost', 0)}"
            elif r.get("outcome") in ("finished", "failed"):
                how = f"{r['outcome']} at {self.unit} {r.get('end')}"
            lines.append(f"attempt {r.get('attempt')}: from {self.unit} {r.get('start')}: {how}")
        return lines

    def _write(self, records: list[dict[str, Any]]) -> None:
        with writing_to(self.path.parent):
            write_json_atomic(self.path, records, indent=1)
