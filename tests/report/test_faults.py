"""Faults of the report stage: a full disk under the tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faults import Workspace, assert_clean_failure, files_under, run_on_small_disk, write_params_file

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


def test_full_disk_during_report(fault_workspace: Workspace, tmp_path: Path) -> None:
    from xtra.probe.cli import probe_model

    staged = tmp_path / "staged"
    assert probe_model(fault_workspace.params_for(tmp_path, results=staged), "rand", use_ray=False) == 0
    probe_files = files_under(staged)
    assert {"probe/rand/bench_a-linear.json", "probe/rand/bench_b-linear.json"} <= set(probe_files)
    results = tmp_path / "results"
    params = fault_workspace.params_for(tmp_path)
    args = ["report", "--params", str(write_params_file(tmp_path, params)), "--readme", ""]
    run = run_on_small_disk(args, tmp_path, results, size_kb=64, free_kb=0, seed=staged)
    assert_clean_failure(run, results / "tables")
    assert run.files == probe_files, f"a failed report left {sorted(set(run.files) - set(probe_files))}"
