"""Faults of the pretrain stage: a full disk at the first checkpoint (a NaN loss: tests/train/test_pretrain.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faults import Workspace, assert_clean_failure, no_tmp, run_on_small_disk, write_params_file

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


# m trains and fills the disk at its first periodic checkpoint (step 2, over 1 MB), leaving only its
# records (the plan, logs, attempts, TensorBoard events): no checkpoint, no model file, nothing half
# written; rand is the random-init control, whose one checkpoint (about 360 KB) does not fit
RECORDS = {"run.json", "log.csv", "val.csv", "trajectory.json", "attempts.json", "hparams.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "size_kb", "records"), [("m", 512, True), ("rand", 128, False)])
def test_full_disk_during_pretrain(
    fault_workspace: Workspace, tmp_path: Path, model: str, size_kb: int, records: bool
) -> None:
    models = tmp_path / "models"
    params = fault_workspace.params_for(tmp_path, models=models)
    run = run_on_small_disk(
        ["pretrain", model, "--params", str(write_params_file(tmp_path, params))], tmp_path, models, size_kb=size_kb
    )
    assert_clean_failure(run, models / model)
    no_tmp(run.files)
    kept = {name for name in run.files if Path(name).name in RECORDS or "/tb/" in name}
    assert set(run.files) == kept, f"a failed pretrain left {sorted(set(run.files) - kept)} beside its records"
    assert bool(kept) == records, sorted(run.files)
    if records:
        assert f"{model}/run.json" in kept  # the plan is written before the first step
