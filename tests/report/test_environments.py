"""The report's mark of a table whose cells come from mixed environments (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tests.report.test_report import _row, make_demo
from xtra.report.cli import build_report
from xtra.report.environments import COLUMN

CPU = {"threads": 1, "interop_threads": 1, "ranks": 1, "device": "cpu", "device_name": "Some CPU", "torch": "2.5.1"}


def _record(path: Path, *envs: dict) -> None:
    """Give a result (or a model's metrics.json) the environments of its segments."""
    data = json.loads(path.read_text())
    data["environments"] = [{"from_epoch": 2 * i, "environment": env} for i, env in enumerate(envs)]
    path.write_text(json.dumps(data))


def _record_all(tmp: Path, env: dict) -> None:
    for path in sorted((tmp / "results" / "probe").glob("*/*-*.json")):
        _record(path, env)
    _record(tmp / "models" / "xtra" / "metrics.json", env)


def test_one_environment_leaves_the_table_unmarked(tmp_path):
    params = make_demo(tmp_path)
    _record_all(tmp_path, CPU)
    report = build_report(params, tmp_path / "results")
    assert report.mixed is None and COLUMN not in report.table.columns
    assert "Mixed environments" not in (tmp_path / "results" / "tables" / "top1.md").read_text()
    results = report.collected.results.set_index(["model", "benchmark", "kind"])
    assert json.loads(results.loc[("xtra", "in1k", "attentive"), "environments"]) == [CPU]


def test_results_from_two_thread_counts_mark_the_table_and_name_each_rows(tmp_path):
    params = make_demo(tmp_path)
    _record_all(tmp_path, CPU)
    two = {**CPU, "threads": 2}
    _record(tmp_path / "results" / "probe" / "xtra" / "in1k-linear.json", two)  # this cell on 2 threads
    _record(tmp_path / "results" / "probe" / "xtra" / "cifar10-attentive.json", CPU, two)  # resumed on 2
    report = build_report(params, tmp_path / "results")
    assert report.mixed is not None and report.mixed.fields == {"probe": ["threads"]}
    table = pd.read_csv(tmp_path / "results" / "tables" / "top1.csv", keep_default_na=False)
    assert _row(table, "run", "xtra", "linear")[COLUMN] == "probe threads=2"
    assert _row(table, "run", "xtra", "attentive")[COLUMN] == "probe threads=1,2"
    assert _row(table, "run", "random", "attentive")[COLUMN] == "probe threads=1"
    assert set(table.loc[~table["row"].isin(["run", "floor"]), COLUMN]) == {""}  # published rows: none
    md = (tmp_path / "results" / "tables" / "top1.md").read_text()
    assert "Mixed environments: the cells of this table come from 2 probe environments that differ in `threads`" in md


def test_models_trained_on_different_rank_counts_mark_the_table(tmp_path):
    params = make_demo(tmp_path)
    _record_all(tmp_path, CPU)
    _record(tmp_path / "models" / "xtra" / "metrics.json", CPU, {**CPU, "ranks": 2})  # resumed on 2 ranks
    report = build_report(params, tmp_path / "results")
    assert report.mixed is not None and report.mixed.fields == {"pretrain": ["ranks"]}
    table = pd.read_csv(tmp_path / "results" / "tables" / "top1.csv", keep_default_na=False)
    assert _row(table, "run", "xtra", "attentive")[COLUMN] == "pretrain ranks=1,2"
    assert _row(table, "run", "random", "attentive")[COLUMN] == ""  # not trained: no pre-training environment
