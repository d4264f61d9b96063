"""Faults of the pretrain stage: a full disk at the first checkpoint (a NaN loss: tests/train/test_pretrain.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.faults import Workspace, assert_clean_failure, no_tmp, run_on_small_disk, write_params_file

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


# m trains and fills the disk at its first periodic checkpoint (step 2, over 1 MB), leaving only its
# log; rand is the random-init control, whose one checkpoint (about 360 KB) does not fit
@pytest.mark.slow
@pytest.mark.parametrize(("model", "size_kb", "left"), [("m", 512, {"m/log.csv"}), ("rand", 128, set())])
def test_full_disk_during_pretrain(
    fault_workspace: Workspace, tmp_path: Path, model: str, size_kb: int, left: set[str]
) -> None:
    models = tmp_path / "models"
    params = fault_workspace.params_for(tmp_path, models=models)
    run = run_on_small_disk(
        ["pretrain", model, "--params", str(write_params_file(tmp_path, params))], tmp_path, models, size_kb=size_kb
    )
    assert_clean_failure(run, models / model)
    no_tmp(run.files)
    assert set(run.files) == left, f"a failed pretrain left {sorted(run.files)}"
