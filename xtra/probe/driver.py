"""Run a model's probe jobs: as Ray tasks (locally or on a cluster) or in this process, with retries.

Each job returns its result dict; the driver writes `results/probe/<model>/<benchmark>-<kind>.json`
as soon as the job ends (so a cluster needs no shared results folder). A job that still fails after
`max_retries` retries is reported on stderr and in `results/probe/<model>/failures.json`
({"failures": [{"job", "benchmark", "kind", "error", "attempts"}]}); the other jobs still finish.

Ray: `ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=max_retries,
retry_exceptions=True)`. With gpus_per_job 0 a job gets one GPU when the cluster has GPUs. A local
Ray starts with the machine's cores, without dashboard and usage statistics (offline); a Ray that
is already initialised in this process is reused (and left running).

Offline use: usage statistics are off (RAY_USAGE_STATS_ENABLED=0); Ray's session folder is
`$RAY_TMPDIR/ray` (default /tmp/ray; keep the path short, Ray's socket paths must stay under 108
characters). On a cluster, every node needs this package installed and the prepared data and
model checkpoints at the same paths (a shared filesystem); results travel back to the driver.

Fault-injection hooks (read by the driver, passed to the jobs as arguments, so they work on any
cluster): XTRA_PROBE_FAIL_JOBS, a comma-separated list of job names (`<benchmark>-<kind>`, or `*`)
whose every attempt raises `InjectedFailure`; XTRA_PROBE_ATTEMPT_LOG, a file to which every attempt
appends a line `<model>/<job>`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from xtra.errors import XtraError, writing_to
from xtra.atomic import write_json_atomic
from xtra.probe.job import ProbeJob, result_path, run_job, write_result

__all__ = ["FAIL_ENV", "ATTEMPT_LOG_ENV", "InjectedFailure", "JobFailure", "Hooks", "attempt_job",
           "run_in_process", "run_with_ray", "init_ray", "record_failures", "failures_path"]

FAIL_ENV = "XTRA_PROBE_FAIL_JOBS"
ATTEMPT_LOG_ENV = "XTRA_PROBE_ATTEMPT_LOG"


class InjectedFailure(RuntimeError):
    """Raised inside a job named by XTRA_PROBE_FAIL_JOBS (tests of the retry and report paths)."""


@dataclass(frozen=True)
class JobFailure:
    job: ProbeJob
    error: str
    attempts: int


@dataclass(frozen=True)
class Hooks:
    """The fault-injection settings of one job."""

    fail: bool = False
    attempt_log: Optional[str] = None

    @classmethod
    def from_env(cls, job: ProbeJob) -> "Hooks":
        names = {n.strip() for n in os.environ.get(FAIL_ENV, "").split(",") if n.strip()}
        return cls(fail=job.name in names or "*" in names, attempt_log=os.environ.get(ATTEMPT_LOG_ENV) or None)


def attempt_job(params: dict, job: ProbeJob, hooks: Hooks) -> dict:
    """One attempt of a job (the body of the Ray task)."""
    if hooks.attempt_log:
        with open(hooks.attempt_log, "a", encoding="utf-8") as handle:
            handle.write(f"{job.model}/{job.name}\n")
    if hooks.fail:
        raise InjectedFailure(f"injected failure of probe job {job.model}/{job.name} ({FAIL_ENV})")
    return run_job(params, job)


def _finished(params: dict, job: ProbeJob, result: dict) -> None:
    with writing_to(result_path(params, job).parent):
        path = write_result(params, job, result)
    print(f"[{job.model}/{job.name}] top-1 {result['top1']:.2f} % ({result['protocol']} protocol, "
          f"lr {result['selected']['lr']:g}, wd {result['selected']['weight_decay']:g}) -> {path}", flush=True)


def _failed(failure: JobFailure) -> None:
    print(f"error: probe job {failure.job.model}/{failure.job.name} failed after {failure.attempts} "
          f"attempt(s): {failure.error}", file=sys.stderr, flush=True)


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the job's own exception
    exc = cause if isinstance(cause, BaseException) else exc
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


def run_in_process(params: dict, jobs: Sequence[ProbeJob], max_retries: int) -> list[JobFailure]:
    """Run the jobs one after the other in this process, each retried up to max_retries times."""
    failures = []
    for job in jobs:
        hooks = Hooks.from_env(job)
        for attempt in range(1, max_retries + 2):
            try:
                result = attempt_job(params, job, hooks)
            except Exception as exc:  # noqa: BLE001 - any failure of a job is retried, then reported
                print(f"[{job.model}/{job.name}] attempt {attempt} failed: {_describe(exc)}", file=sys.stderr)
                if attempt > max_retries:
                    failures.append(JobFailure(job, _describe(exc), attempt))
                    _failed(failures[-1])
                continue
            _finished(params, job, result)
            break
    return failures


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Connect to `address` or start a light local Ray; returns False when one was already running."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r} (probe.ray.address / --ray-address)" if address else "a local Ray"
        raise XtraError(f"cannot start or reach {where}: {exc}") from exc
    return True


def _task_options(ray_cfg: dict) -> dict:
    import ray

    gpus = float(ray_cfg["gpus_per_job"])
    if gpus == 0 and ray.cluster_resources().get("GPU", 0) > 0:
        gpus = 1.0
    return {"num_cpus": ray_cfg["cpus_per_job"], "num_gpus": gpus, "max_retries": ray_cfg["max_retries"],
            "retry_exceptions": True}


def run_with_ray(params: dict, jobs: Sequence[ProbeJob], address: Optional[str] = None,
                 num_cpus: Optional[int] = None) -> list[JobFailure]:
    """Submit every job as a Ray task; write each result as it arrives; return the failures."""
    import ray

    ray_cfg = params["probe"]["ray"]
    started = init_ray(address or ray_cfg["address"], num_cpus)
    try:
        task = ray.remote(attempt_job).options(**_task_options(ray_cfg))
        pending = {task.remote(params, job, Hooks.from_env(job)): job for job in jobs}
        failures: list[JobFailure] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                failures.append(JobFailure(job, _describe(exc), ray_cfg["max_retries"] + 1))
                _failed(failures[-1])
                continue
            _finished(params, job, result)
        return failures
    finally:
        if started:
            ray.shutdown()


def failures_path(params: dict, model: str) -> Path:
    return Path(params["paths"]["results"]) / "probe" / model / "failures.json"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for `path` (parallel Snakemake probe jobs of one model share the file).

    The lock file lies one folder up (`results/probe/.<model>.failures.lock`), outside the model's
    result folder that DVC caches as the stage's output.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent.parent / f".{path.parent.name}.failures.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_failures(params: dict, model: str, jobs: Sequence[ProbeJob], failures: Sequence[JobFailure]) -> None:
    """Update failures.json: entries of this run's jobs replaced by this run's failures; removed if empty."""
    path = failures_path(params, model)
    ran = {job.name for job in jobs}
    with writing_to(path.parent), _locked(path):
        kept: list[dict] = []
        if path.is_file():
            try:
                kept = [f for f in json.loads(path.read_text()).get("failures", []) if f.get("job") not in ran]
            except (ValueError, AttributeError):
                kept = []  # a malformed old file is replaced
        entries = kept + [{"job": f.job.name, "benchmark": f.job.benchmark, "kind": f.job.kind,
                           "error": f.error, "attempts": f.attempts,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")} for f in failures]
        if entries:
            write_json_atomic(path, {"model": model, "failures": entries}, indent=1)
        elif path.exists():
            path.unlink()
    for failure in failures:  # a failed job leaves no stale result behind
        stale = result_path(params, failure.job)
        if stale.exists():
            stale.unlink()
