"""The environment record (issue 26): what it holds, the thread count applied, segments kept only when
the environment changes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from xtra.environment import add_segment, apply_threads, environment


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # restored after the test
    yield
    torch.set_num_threads(before)


def test_the_environment_names_threads_ranks_device_and_torch(restore_threads) -> None:
    torch.set_num_threads(1)
    env = environment(3, "cpu")
    assert env["threads"] == 1 and env["ranks"] == 3 and env["device"] == "cpu"
    assert env["device_name"] and env["device_name"] != "unknown"
    assert env["torch"] == torch.__version__ and type(env["torch"]) is str  # loadable with weights_only
    assert pickle.loads(pickle.dumps(env)) == env


def test_threads_are_applied_to_torch_and_the_processes_it_starts(restore_threads) -> None:
    apply_threads(2)
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert environment(1, "cpu")["threads"] == 2
    apply_threads(None)  # null: torch's own choice, left as it is
    assert torch.get_num_threads() == 2


def test_a_segment_is_added_only_when_the_environment_changes() -> None:
    one = {"threads": 1, "ranks": 1, "device": "cpu", "device_name": "x", "torch": "2"}
    segments, changed = add_segment([], "from_step", 0, one)
    assert segments == [{"from_step": 0, "environment": one}] and changed == []
    same, changed = add_segment(segments, "from_step", 20, dict(one))  # resumed in the same environment
    assert same == segments and changed == []
    two = {**one, "threads": 2}
    more, changed = add_segment(segments, "from_step", 20, two)
    assert more == [*segments, {"from_step": 20, "environment": two}]
    assert changed == ["threads: 1 -> 2"]


def test_no_identity_depends_on_threads_or_loader_workers() -> None:
    """`resources.threads` and `num_workers` shape no result's identity, so changing them re-runs nothing."""
    from tests.conftest import demo_params
    from xtra.config import validate_params
    from xtra.identity import stage_keys

    params = validate_params(demo_params(), check_paths=False)
    keys = [k for m in params["models"] for k in stage_keys(params, "pretrain", model=m)]
    keys += [
        k
        for m in params["models"]
        for b, bench in params["probe"]["benchmarks"].items()
        for k in stage_keys(params, "probe", model=m, benchmark=b, kinds=bench["kinds"])
    ]
    assert any(k.endswith(".train.lr") for k in keys)  # the table is not empty
    assert not [k for k in keys if k.endswith(("num_workers", "threads")) or ".resources" in k]
