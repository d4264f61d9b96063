"""Run a model's probe jobs: as Ray tasks (locally or on a cluster) or in this process, with retries.

A job is one (model, benchmark) with all its kinds; it returns one result dict per kind, and the
driver writes `results/probe/<model>/<benchmark>-<kind>.json` as soon as the job ends (so a cluster
needs no shared results folder). A job that still fails after `max_retries` retries is reported on
stderr and in `results/probe/<model>/failures.json` ({"failures": [{"job", "benchmark", "kind",
"error", "attempts"}]}, one entry per kind of the job, `job` being `<benchmark>-<kind>`); the other
jobs still finish. A job whose result files all exist and record its identity is skipped
(`is_finished`). A retried job (Ray's `max_retries`, or a re-run) continues from its last saved
epoch (`xtra.probe.state`); a finished one writes the results its state kept.

Ray: `ray.remote(num_cpus=cpus_per_job, num_gpus=G, max_retries=max_retries, retry_exceptions=True)`
with G = the benchmark's `devices` when the cluster has GPUs (the job's processes all on the node
Ray places it on), else `gpus_per_job` (0 on a CPU cluster). A local Ray is sized by the allocation,
not the machine: the CPUs this process may run on (Lightning's affinity-aware count, which
reflects Slurm/LSF CPU binding) capped by the container's cgroup quota (Ray's own detection); Ray
detects the GPUs itself (CUDA_VISIBLE_DEVICES as set by the scheduler). No dashboard and no usage
statistics (offline); a Ray that is already initialised in this process is reused (and left running).

Offline use: usage statistics are off (RAY_USAGE_STATS_ENABLED=0); Ray's session folder is
`$RAY_TMPDIR/ray` (default /tmp/ray; keep the path short, Ray's socket paths must stay under 108
characters). On a cluster, every node needs this package installed and the prepared data and
model checkpoints at the same paths (a shared filesystem); results travel back to the driver.

Fault-injection hooks (read by the driver, passed to the jobs as arguments, so they work on any
cluster): XTRA_PROBE_FAIL_JOBS, a comma-separated list of job names (`<benchmark>`, or `*`) whose
every attempt raises `InjectedFailure`; XTRA_PROBE_ATTEMPT_LOG, a file to which every attempt
appends a line `<model>/<benchmark>`; XTRA_PROBE_KILL_AFTER_EPOCH=N, SIGKILL the job's process
after its state for epoch N is saved; XTRA_PROBE_FAIL_AFTER_EPOCH=N, raise once after epoch N is
saved (an attempt that resumed at or after N does not raise).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xtra.atomic import write_json_atomic
from xtra.errors import OutputError, XtraError, writing_to
from xtra.probe.job import InjectedFailure, JobHooks, ProbeJob, result_path, run_job, write_results

__all__ = [
    "FAIL_ENV",
    "ATTEMPT_LOG_ENV",
    "KILL_AFTER_ENV",
    "FAIL_AFTER_ENV",
    "InjectedFailure",
    "JobFailure",
    "Hooks",
    "attempt_job",
    "run_in_process",
    "run_with_ray",
    "init_ray",
    "allocated_cpus",
    "record_failures",
    "failures_path",
    "is_finished",
]

FAIL_ENV = "XTRA_PROBE_FAIL_JOBS"
ATTEMPT_LOG_ENV = "XTRA_PROBE_ATTEMPT_LOG"
KILL_AFTER_ENV = "XTRA_PROBE_KILL_AFTER_EPOCH"
FAIL_AFTER_ENV = "XTRA_PROBE_FAIL_AFTER_EPOCH"


@dataclass(frozen=True)
class JobFailure:
    job: ProbeJob
    error: str
    attempts: int


@dataclass(frozen=True)
class Hooks:
    """The fault-injection settings of one job."""

    fail: bool = False
    attempt_log: str | None = None
    job: JobHooks = JobHooks()

    @classmethod
    def from_env(cls, job: ProbeJob) -> Hooks:
        names = {n.strip() for n in os.environ.get(FAIL_ENV, "").split(",") if n.strip()}
        after = {
            key: int(os.environ[env])
            for key, env in (("kill_after_epoch", KILL_AFTER_ENV), ("fail_after_epoch", FAIL_AFTER_ENV))
            if os.environ.get(env)
        }
        return cls(
            fail=job.name in names or "*" in names,
            attempt_log=os.environ.get(ATTEMPT_LOG_ENV) or None,
            job=JobHooks(**after),
        )


def attempt_job(params: dict, job: ProbeJob, hooks: Hooks) -> dict[str, dict]:
    """One attempt of a job (the body of the Ray task): {kind: result}."""
    if hooks.attempt_log:
        with open(hooks.attempt_log, "a", encoding="utf-8") as handle:
            handle.write(f"{job.model}/{job.name}\n")
    if hooks.fail:
        raise InjectedFailure(f"injected failure of probe job {job.model}/{job.name} ({FAIL_ENV})")
    return run_job(params, job, hooks.job)


def _finished(params: dict, job: ProbeJob, results: dict[str, dict]) -> None:
    with writing_to(result_path(params, job.model, job.benchmark, job.kinds[0]).parent):
        paths = write_results(params, job, results)
    for path, result in zip(paths, results.values()):
        print(
            f"[{job.model}/{job.name}] {result['kind']} top-1 {result['top1']:.2f} % ({result['protocol']} "
            f"protocol, lr {result['selected']['lr']:g}, wd {result['selected']['weight_decay']:g}) -> {path}",
            flush=True,
        )


def is_finished(params: dict, job: ProbeJob) -> bool:
    """True when every result file of the job exists and records this very job's identity
    (`xtra.probe.job.job_identity`): a result of an earlier job, or of the same job under other params,
    another model or other data, is no finished result, even when a later state says it trained."""
    from xtra.errors import XtraError
    from xtra.probe.job import job_identity

    paths = [result_path(params, job.model, job.benchmark, k) for k in job.kinds]
    if not all(p.is_file() for p in paths):
        return False
    try:
        identity, _ = job_identity(params, job)
    except XtraError:  # no model file or no prepared data: preflight says which
        return False
    for path in paths:
        try:
            if json.loads(path.read_text()).get("identity") != identity:
                return False
        except (OSError, ValueError, AttributeError):
            return False
    return True


def _failed(failure: JobFailure) -> None:
    print(
        f"error: probe job {failure.job.model}/{failure.job.name} failed after {failure.attempts} "
        f"attempt(s): {failure.error}",
        file=sys.stderr,
        flush=True,
    )


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
            except OutputError:
                raise  # a full disk or read-only results folder: retrying cannot help; one clean error
            except Exception as exc:  # noqa: BLE001 - any failure of a job is retried, then reported
                print(f"[{job.model}/{job.name}] attempt {attempt} failed: {_describe(exc)}", file=sys.stderr)
                if attempt > max_retries:
                    failures.append(JobFailure(job, _describe(exc), attempt))
                    _failed(failures[-1])
                continue
            _finished(params, job, result)
            break
    return failures


def allocated_cpus() -> int:
    """The CPUs this job may use: the affinity mask (Lightning's count; Slurm/LSF bind to it) capped
    by the container's cgroup quota (Ray's detection)."""
    from lightning.fabric.utilities.data import _num_cpus_available
    from ray._private.utils import get_num_cpus

    return max(1, min(_num_cpus_available(), int(get_num_cpus(override_docker_cpu_warning=True))))


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
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
            ray.init(num_cpus=num_cpus or allocated_cpus(), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r} (probe.ray.address / --ray-address)" if address else "a local Ray"
        raise XtraError(f"cannot start or reach {where}: {exc}") from exc
    return True


def _task_options(ray_cfg: dict, devices: int) -> dict:
    """The Ray resources of a job of `devices` devices: that many GPUs when the cluster has GPUs."""
    import ray

    gpus = float(ray_cfg["gpus_per_job"])
    if ray.cluster_resources().get("GPU", 0) > 0:
        gpus = max(gpus, float(devices))
    return {
        "num_cpus": ray_cfg["cpus_per_job"],
        "num_gpus": gpus,
        "max_retries": ray_cfg["max_retries"],
        "retry_exceptions": True,
    }


def run_with_ray(
    params: dict, jobs: Sequence[ProbeJob], address: str | None = None, num_cpus: int | None = None
) -> list[JobFailure]:
    """Submit every job as a Ray task; write each result as it arrives; return the failures."""
    import ray

    ray_cfg = params["probe"]["ray"]
    started = init_ray(address or ray_cfg["address"], num_cpus)
    try:
        task = ray.remote(attempt_job)
        devices = {job: params["probe"]["benchmarks"][job.benchmark]["devices"] for job in jobs}
        pending = {
            task.options(**_task_options(ray_cfg, devices[job])).remote(params, job, Hooks.from_env(job)): job
            for job in jobs
        }
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
    ran = {name for job in jobs for name in job.result_names()}
    with writing_to(path.parent), _locked(path):
        kept: list[dict] = []
        if path.is_file():
            try:
                kept = [f for f in json.loads(path.read_text()).get("failures", []) if f.get("job") not in ran]
            except (ValueError, AttributeError):
                kept = []  # a malformed old file is replaced
        entries = kept + [
            {
                "job": f"{f.job.benchmark}-{kind}",
                "benchmark": f.job.benchmark,
                "kind": kind,
                "error": f.error,
                "attempts": f.attempts,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            for f in failures
            for kind in f.job.kinds
        ]
        if entries:
            write_json_atomic(path, {"model": model, "failures": entries}, indent=1)
        elif path.exists():
            path.unlink()
    for failure in failures:  # a failed job leaves no stale result behind
        for kind in failure.job.kinds:
            stale = result_path(params, failure.job.model, failure.job.benchmark, kind)
            if stale.exists():
                stale.unlink()
