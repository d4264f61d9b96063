"""docs/extending.md, followed as written: its code blocks (a toy reader, its params entry and fixture,
a toy probe kind and its test) run in this process, then the toy dataset is prepared, a random-init
model made and probed on the toy benchmark with the linear kind and the new one, end to end.
The walk-through's file counts are checked too: each block is one file of the change."""

from __future__ import annotations

import json
import re
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, demo_params
from xtra.config import validate_params
from xtra.data.readers import READERS, read_dataset
from xtra.model.probes import PROBE_KINDS
from xtra.pipeline.dag import stage_table

DOC = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"<!-- walk-through: (\S+) -->\n```(\w+)\n(.*?)```", re.S)


def walk_through() -> dict[str, tuple[str, str]]:
    """{file: (language, code)} of the walk-through's blocks, in the order of the page."""
    return {path: (lang, code) for path, lang, code in BLOCK.findall(DOC.read_text())}


def run_block(path: str) -> types.ModuleType:
    """Run a Python block as the module it would be saved as (its registrations happen here)."""
    _, code = walk_through()[path]
    module = types.ModuleType(path.removesuffix(".py").replace("/", "."))
    exec(compile(code, f"{DOC}:{path}", "exec"), module.__dict__)  # the page's own code
    return module


@pytest.fixture
def extended() -> Iterator[dict[str, types.ModuleType]]:
    """The toy reader and the toy probe kind registered as the page registers them; removed after."""
    try:
        yield {path: run_block(path) for path, (lang, _) in walk_through().items() if lang == "python"}
    finally:
        READERS.remove("toy")
        PROBE_KINDS.remove("maxpool")


def test_the_walk_through_touches_three_files_for_a_benchmark_and_two_for_a_probe_kind():
    files = list(walk_through())
    assert files == [
        "xtra/data/readers/toy.py",
        "params.yaml",
        "tests/fixtures/raw_toy.py",
        "xtra/model/probe_kinds/maxpool.py",
        "tests/model/test_probe_kind_maxpool.py",
    ]


def test_a_new_benchmark_and_probe_kind_are_prepared_and_probed_end_to_end(extended, tmp_path: Path, one_thread):
    from xtra.data.prepare import prepare_dataset
    from xtra.probe.cli import probe_model
    from xtra.train.pretrain import pretrain_model

    # the fixture matches the reader, as tests/data/test_readers.py checks every registered kind
    info = extended["tests/fixtures/raw_toy.py"].make_toy(tmp_path / "raw")
    dataset = read_dataset(info.params)
    assert dataset.classes == info.classes
    assert {split: len(samples) for split, samples in dataset.splits.items()} == info.split_counts
    found = {s.key: (split, s.label) for split, samples in dataset.splits.items() for s in samples}
    assert all(found[key] == value for key, value in info.expected.items())
    # the probe kind's own test
    extended["tests/model/test_probe_kind_maxpool.py"].test_maxpool_reads_the_last_block_and_takes_the_largest_token()

    params = demo_params()
    entry = yaml.safe_load(walk_through()["params.yaml"][1])
    params["datasets"] = entry["datasets"]
    params["probe"]["benchmarks"] = entry["probe"]["benchmarks"]
    params["paths"] = {k: str(tmp_path / k) for k in ("prepared", "models", "results")}
    arch = {**params["models"]["random_k2"]["arch"], "img_size": 16, "width": 32, "depth": 2, "num_heads": 2}
    params["models"] = {"rand": {"init": "random", "dataset": "toy", "eval_resize": 16, "arch": arch}}
    params = validate_params(params, "walk-through params", check_paths=False)
    probes = [s for s in stage_table(params) if s.kind == "probe"]
    assert [o.rsplit("/", 1)[1] for s in probes for o in s.outs] == ["toy-linear.json", "toy-maxpool.json"]

    prepare_dataset("toy", params["datasets"]["toy"], Path(params["paths"]["prepared"]))
    pretrain_model(params, "rand")
    assert probe_model(params, "rand", use_ray=False) == 0
    for kind in ("linear", "maxpool"):
        result = json.loads((tmp_path / "results" / "probe" / "rand" / f"toy-{kind}.json").read_text())
        assert result["kind"] == kind and len(result["heads"]) == 2 and 0 <= result["top1"] <= 100
