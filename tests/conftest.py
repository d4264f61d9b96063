"""Fixtures shared by the test folders (tests/<stage>/ mirror the package; each folder's own are in its
conftest.py; builders of raw datasets, models and fault set-ups are the package tests/fixtures): the
demo datasets prepared once per session, the fault tests' workspace, params files in tmp dirs, one
thread, and the run budget of CI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
XTRA = [sys.executable, "-m", "xtra.cli"]

# a small, fast model for stage tests: same structure as the demo, fewer blocks
SMALL_ARCH = {
    "preset": "tiny",
    "width": 64,
    "depth": 2,
    "num_heads": 2,
    "img_size": 32,
    "patch_size": 4,
    "block_size": 2,
    "predictor_depth": 1,
    "predictor_width": 32,
    "predictor_num_heads": 2,
}


def demo_params() -> dict[str, Any]:
    """The demo's params with one torch thread per job (the commands apply `resources.threads`; the tests
    pin one thread, as `one_thread` does in this process)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in [*params["models"].values(), params["probe"]]:
        section["resources"]["threads"] = 1
    return params


def write_params(directory: Path, params: dict[str, Any], prepared: Path | None = None) -> Path:
    """Write `params` to directory/params.yaml with every path inside `directory` (prepared may be shared)."""
    params = copy.deepcopy(params)
    params["paths"] = {
        "prepared": str(prepared or directory / "data" / "prepared"),
        "models": str(directory / "models"),
        "results": str(directory / "results"),
    }
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_xtra(*args: str, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*XTRA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"xtra {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from more, and OpenMP spins on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread here and in every `xtra` subprocess (OMP_NUM_THREADS): the fault tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fault_workspace(tmp_path_factory):
    """The fault tests' workspace (tests.fixtures.faults): two tiny prepared datasets and a random-init model."""
    from tests.fixtures.faults import build_workspace

    return build_workspace(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory) -> Path:
    """The demo datasets (mnist5k, digits) prepared once per test session; returns the prepared root."""
    from xtra.config import validate_params
    from xtra.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("prepared")
    params = validate_params(demo_params())
    for name in ("mnist5k", "digits"):
        prepare_dataset(name, params["datasets"][name], root)
    return root


def small_model(**train: Any) -> dict[str, Any]:
    """A model entry of params.yaml with SMALL_ARCH pre-trained on mnist5k."""
    return {
        "init": "pretrain",
        "dataset": "mnist5k",
        "eval_resize": 32,
        "arch": dict(SMALL_ARCH),
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "accelerator": "cpu",
            "num_workers": 0,
            "checkpoint_every_n_steps": 10,
            "log_every_n_steps": 5,
            "reconstruct_images": 2,
            **train,
        },
    }


# ---- a wall-clock budget for long runs (CI) --------------------------------------------------------
# With XTRA_TEST_DEADLINE set (seconds since the epoch), a test that would start after it is skipped
# and says why, instead of a whole run overrunning its budget: CI sets it for the slow tests so
# that they fit its 90 minutes; nothing already started is cut. Unset (the default), it does nothing.
DEADLINE_ENV = "XTRA_TEST_DEADLINE"


def pytest_runtest_setup(item: pytest.Item) -> None:
    import time

    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(f"not started: the run's time budget ({DEADLINE_ENV}) is spent; `make test-all` runs it")
