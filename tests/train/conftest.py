"""Fixtures of the pre-training tests: the small class-folder dataset, prepared once for the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.pretrain import prepare_small


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(its folder, the prepared root) of the small dataset (tests.fixtures.pretrain)."""
    tmp = tmp_path_factory.mktemp("small")
    return tmp, prepare_small(tmp)
