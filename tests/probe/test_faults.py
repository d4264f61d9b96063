"""Faults of the probe stage: SIGKILL mid-job, a job that keeps crashing under Ray (and the report made
after it), bad model files refused before any job, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import XTRA, run_xtra
from tests.fixtures.faults import (
    Workspace,
    assert_clean_failure,
    check_probe_result,
    files_under,
    kill,
    run_on_small_disk,
    wait_for,
    write_params_file,
)

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


def _corrupt(kind: str, ckpt: Path, params: dict[str, Any]) -> str:
    """Spoil the model `rand` one way; returns what the error message must say."""
    import torch

    if kind == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
        return f"model file {ckpt} cannot be read as a weights-only file"
    if kind == "architecture":
        params["models"]["rand"]["arch"]["depth"] = 3
        return f"{ckpt} has a different architecture than params: depth: checkpoint 2 vs params 3"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = "encoder.blocks.1.mlp.fc1.weight"
    assert key in state["state_dict"]
    del state["state_dict"][key]
    torch.save(state, ckpt)
    return f"{ckpt} (encoder) does not match the architecture: missing keys: ['blocks.1.mlp.fc1.weight']"


@pytest.mark.slow
def test_killed_probe_leaves_only_whole_results_and_a_rerun_completes(
    fault_workspace: Workspace, tmp_path: Path
) -> None:
    from xtra.probe.driver import ATTEMPT_LOG_ENV

    params = fault_workspace.params_for(tmp_path)
    # the second job trains long enough to be killed inside it
    params["probe"]["benchmarks"]["bench_b"].update(kinds=["attentive"], epochs=600)  # about 2 s
    path = write_params_file(tmp_path, params)
    attempts = tmp_path / "attempts.log"
    out = tmp_path / "results" / "probe" / "rand"
    command = [*XTRA, "probe", "rand", "--params", str(path), "--no-ray"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, ATTEMPT_LOG_ENV: str(attempts)},
        )
        try:
            wait_for(
                lambda: attempts.exists() and len(attempts.read_text().splitlines()) >= 2,
                proc,
                "the second job's start",
            )
            time.sleep(0.3)
        finally:
            kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert attempts.read_text().splitlines() == ["rand/bench_a", "rand/bench_b"]
    assert sorted(files_under(out)) == ["bench_a-linear.json"], (tmp_path / "killed.log").read_text()
    check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")

    rerun = run_xtra("probe", "rand", "--params", str(path), "--no-ray", cwd=tmp_path)
    assert "1 finished job(s) skipped: bench_a" in rerun.stdout and "1/1 job(s) succeeded" in rerun.stdout
    assert sorted(files_under(out)) == ["bench_a-linear.json", "bench_b-attentive.json"]
    check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")
    assert check_probe_result(out / "bench_b-attentive.json", "rand", "bench_b", "attentive")["epochs"] == 600


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crashing_ray_job_is_retried_reported_and_marked_in_the_report(
    fault_workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    from xtra.probe.cli import probe_model
    from xtra.probe.driver import ATTEMPT_LOG_ENV, FAIL_ENV
    from xtra.report.cli import build_report

    params = fault_workspace.params_for(tmp_path)
    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(FAIL_ENV, "bench_b")
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    assert probe_model(params, "rand", use_ray=True, num_cpus=2) == 1
    lines = attempts.read_text().splitlines()
    assert sorted(lines) == ["rand/bench_a", "rand/bench_b", "rand/bench_b"]  # one retry
    out = tmp_path / "results" / "probe" / "rand"
    assert sorted(files_under(out)) == ["bench_a-linear.json", "failures.json"]
    check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert [(f["job"], f["attempts"]) for f in failures] == [("bench_b-linear", 2)]
    assert "InjectedFailure" in failures[0]["error"]

    params["report"].update(figure_formats=["png"], dpi=50)  # read by build_report, not in the schema (yet)
    report = build_report(params, tmp_path / "results")
    long = pd.read_csv(tmp_path / "results" / "tables" / "results_long.csv")
    assert set(long.loc[long["model"] == "m", "status"]) == {"missing"}  # never probed: missing, not failed
    rows = long[long["model"] == "rand"].set_index("benchmark")
    assert rows.loc["bench_a", "status"] == "ok" and 0 <= rows.loc["bench_a", "top1"] <= 100
    assert rows.loc["bench_b", "status"] == "failed" and np.isnan(rows.loc["bench_b", "top1"])
    reason = rows.loc["bench_b", "reason"]
    assert str(out / "failures.json") in reason and "InjectedFailure" in reason
    markdown = (tmp_path / "results" / "tables" / "top1.md").read_text()
    assert "rand / bench_b / linear / paper: failed (" in markdown and "InjectedFailure" in markdown
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["rand"]["linear"]["paper"]["bench_a"] == pytest.approx(rows.loc["bench_a", "top1"], abs=1e-3)
    assert metrics["rand"]["linear"]["paper"].get("bench_b") is None
    assert (tmp_path / "results" / "figures" / "top1_bars.png").stat().st_size > 0
    assert len(report.files) > 10 and not [f for f in files_under(tmp_path / "results") if f.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["truncated", "architecture", "missing_keys"])
def test_bad_checkpoint_is_refused_before_any_job(
    kind: str,
    fault_workspace: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from xtra.cli import main
    from xtra.probe.driver import ATTEMPT_LOG_ENV

    models = tmp_path / "models"
    shutil.copytree(fault_workspace.root / "models" / "rand", models / "rand")
    params = fault_workspace.params_for(tmp_path, models=models)
    expected = _corrupt(kind, models / "rand" / "model.pt", params)
    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    code = main(["probe", "rand", "--params", str(write_params_file(tmp_path, params)), "--no-ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {expected}"), err
    assert not attempts.exists(), "a probe job started"
    assert files_under(tmp_path / "results") == {}


def test_full_disk_during_probe(fault_workspace: Workspace, tmp_path: Path) -> None:
    results = tmp_path / "results"
    params = fault_workspace.params_for(tmp_path)
    args = ["probe", "rand", "--params", str(write_params_file(tmp_path, params)), "--no-ray"]
    run = run_on_small_disk(args, tmp_path, results, size_kb=64, free_kb=0)
    assert_clean_failure(run, results / "probe-state" / "rand" / "bench_a")  # the job's first file: its state
    assert "[rand/bench_a] kinds ['linear']: 1 heads" in run.stdout  # the job ran; only its files could not be written
    assert run.files == {}, f"a failed probe left {sorted(run.files)}"
