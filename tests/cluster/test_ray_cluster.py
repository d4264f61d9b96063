"""The probe driver on a real two-node Ray cluster (127.0.0.1), one worker killed in the middle of a job.

`ray start --head` and `ray start --address` make two nodes of one CPU each; `xtra probe MODEL`
submits its jobs (one per benchmark) to the cluster named by `probe.ray.address`, so
both nodes run one. Once every job has saved its state after an epoch
(results/probe-state/MODEL/B/), the worker process running a job on the second node is killed
(SIGKILL, as the kernel's OOM killer would): Ray retries the task (`probe.ray.max_retries`), the
retry continues from the saved epoch, and every result equals the one of the same jobs run in
one local process (`--no-ray`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.ray_cluster import RayCluster
from tests.conftest import REPO, SMALL_ARCH, XTRA, demo_params

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

MODEL = "random_k2"
VOLATILE = ()  # result fields allowed to differ between two runs: none (no timing is in a result)
EPOCHS = {"mnist": 6, "digits": 16}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = RayCluster(cpus_per_node=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def probe_params(prepared: Path, models: Path, results: Path, address: str | None) -> dict:
    params = demo_params()
    model = copy.deepcopy(params["models"][MODEL])
    model["arch"] = {**model["arch"], **SMALL_ARCH}  # every arch key spelled out, as params.yaml must
    params["models"] = {MODEL: model}
    params["paths"] = {"prepared": str(prepared), "models": str(models), "results": str(results)}
    probe = params["probe"]
    probe["models"] = [MODEL]
    probe["kinds"]["attentive"]["num_last_blocks"] = SMALL_ARCH["depth"]
    # epochs sized so that both jobs are mid-job at once after their first saved epoch (digits has a
    # third of mnist's images)
    for name, bench in probe["benchmarks"].items():
        bench.update({"epochs": EPOCHS.get(name, 6), "lrs": [0.001, 0.01]})
    probe["ray"] = {**probe.get("ray", {}), "address": address, "max_retries": 1, "cpus_per_job": 1}
    return params


def _xtra(*args: str, params: Path, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [*XTRA, *args, "--params", str(params)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"xtra {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _write(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _results(results: Path) -> dict[str, dict]:
    found = {p.name: json.loads(p.read_text()) for p in sorted((results / "probe" / MODEL).glob("*-*.json"))}
    return {name: {k: v for k, v in r.items() if k not in VOLATILE} for name, r in found.items()}


def _kill_a_job_on_the_second_node(
    cluster: RayCluster, driver: subprocess.Popen, states: Path, jobs: int, driver_log: Path, timeout: float = 900
) -> int:
    """SIGKILL the worker process running a probe job on the joined node, once every job saved a state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        workers = cluster.task_workers("worker", "attempt_job")
        if workers and len(list(states.glob("*/*.pt"))) >= jobs:
            workers[0].kill()
            return workers[0].pid
        time.sleep(0.2)
    raise AssertionError(
        f"no probe job on the second node after every job's first epoch (driver exited "
        f"{driver.poll()}; states {sorted(p.name for p in states.rglob('*'))}):\n"
        f"{driver_log.read_text(errors='replace')[-4000:]}\n{cluster.logs()}"
    )


def test_probe_on_a_ray_cluster_survives_a_killed_worker_and_equals_a_local_run(ray_cluster, prepared_demo, tmp_path):
    models = tmp_path / "models"
    local = _write(
        tmp_path / "local" / "params.yaml", probe_params(prepared_demo, models, tmp_path / "local" / "results", None)
    )
    _xtra("pretrain", MODEL, params=local)  # the seeded random-init encoder, shared by both runs
    _xtra("probe", MODEL, "--no-ray", params=local)

    benchmarks = list(yaml.safe_load(local.read_text())["probe"]["benchmarks"])
    on_ray = _write(
        tmp_path / "ray" / "params.yaml",
        probe_params(prepared_demo, models, tmp_path / "ray" / "results", ray_cluster.address),
    )
    attempts = tmp_path / "attempts.log"
    env = {**os.environ, **ray_cluster.environ(), "PYTHONUNBUFFERED": "1", "XTRA_PROBE_ATTEMPT_LOG": str(attempts)}
    driver_log = tmp_path / "driver.log"
    with driver_log.open("w") as handle:  # a file, not a pipe: nobody reads a pipe while the test waits
        driver = subprocess.Popen(
            [*XTRA, "probe", MODEL, "--params", str(on_ray)], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        killed = _kill_a_job_on_the_second_node(
            ray_cluster, driver, tmp_path / "ray" / "results" / "probe-state" / MODEL, len(benchmarks), driver_log
        )
        driver.wait(timeout=1200)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    out = driver_log.read_text(errors="replace")
    assert driver.returncode == 0, f"driver exited {driver.returncode}:\n{out[-5000:]}\n{ray_cluster.logs()}"
    assert ray_cluster.address in out, out[-2000:]  # it used the cluster of probe.ray.address

    lines = attempts.read_text().split()
    print(f"killed worker pid {killed}; attempts: {lines}")
    assert sorted(set(lines)) == sorted(f"{MODEL}/{b}" for b in benchmarks)
    assert len(lines) == len(benchmarks) + 1, f"expected exactly one job attempted twice: {lines}"
    assert "resuming after epoch" in out, out[-4000:]  # the retry went on from the killed attempt's state

    local_results, ray_results = _results(tmp_path / "local" / "results"), _results(tmp_path / "ray" / "results")
    assert sorted(ray_results) == sorted(local_results) and local_results
    for name, result in local_results.items():
        assert ray_results[name] == result, f"{name}: the Ray cluster's result differs from the local run's"
