"""Fixtures of the `cluster` tests: a real one-node Slurm cluster.

Every test module here but test_time_limits.py (plans only, no scheduler) is marked `cluster` (pytestmark) (not
in the default run; `.ci/run` runs them after the demo, `python -m pytest -m cluster` runs them by hand, as root
with slurm-wlm and munge installed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster.slurm import SlurmCluster, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node cluster; $SLURM_CONF and PATH point every client at it for the session.

    Its daemons end when the session ends, whether the tests passed or not."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    saved = {key: os.environ.get(key) for key in cluster.environ()}
    try:
        cluster.start()
        os.environ.update(cluster.environ())
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
