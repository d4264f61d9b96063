"""The run budget of tests/conftest.py: past XTRA_TEST_DEADLINE a test is skipped with the reason, not run."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def _run_probe_test(deadline: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XTRA_TEST_DEADLINE"}
    if deadline is not None:
        env["XTRA_TEST_DEADLINE"] = deadline
    test = "tests/pipeline/test_params.py::test_bad_params_table_is_large_enough"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.stdout


def test_a_test_past_the_deadline_is_skipped_with_the_reason() -> None:
    out = _run_probe_test("0")  # long past
    assert "1 skipped" in out and "time budget (XTRA_TEST_DEADLINE) is spent" in out


def test_before_the_deadline_or_without_one_tests_run() -> None:
    assert "1 passed" in _run_probe_test("99999999999")
    assert "1 passed" in _run_probe_test(None)
