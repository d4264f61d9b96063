"""The report stage: fabricated probe results -> tables, metrics, plot data and figures."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from xtra.cli import main as xtra_main  # noqa: E402
from xtra.errors import XtraError  # noqa: E402
from xtra.report import build_report, update_readme  # noqa: E402
from xtra.report.cli import MARKERS, configure_parser, run  # noqa: E402
from xtra.report.collect import collect_results, read_pretrain_log  # noqa: E402
from xtra.report.config import ReportConfig  # noqa: E402
from xtra.report.figures import bars_figure  # noqa: E402
from xtra.report.reference import BENCHMARKS, PUBLISHED_IMAGES_SEEN, load_reference  # noqa: E402
from xtra.report.tables import results_table, run_rows, to_markdown  # noqa: E402

AIM = load_reference().query("series == 'AIM-0.6B (DFN-2B+)' and benchmark != 'mean15'")
AIM_TOP1 = dict(zip(AIM["benchmark"], AIM["top1"]))


def _params(tmp: Path, benchmarks: dict, models=("xtra", "random"), protocol: str = "paper") -> dict:
    return {
        "paths": {"results": str(tmp / "results"), "models": str(tmp / "models")},
        "models": {
            m: {"init": "random" if m == "random" else "pretrain", "dataset": "mnist5k", "arch": {}, "train": {}}
            for m in models
        },
        "probe": {
            "protocol": protocol,
            "benchmarks": {b: {"dataset": b, "kinds": kinds, "lrs": [1e-3, 3e-3]} for b, kinds in benchmarks.items()},
        },
        "report": {
            "reference_dir": "xtra/report/reference",
            "reference_models": ["XTRA-B/16", "XTRA-H/14", "AIM-0.6B"],
        },
    }


def _result(
    model: str, benchmark: str, kind: str, top1: float | None, protocol: str = "paper", selected: float = 1e-3
) -> dict:
    """A result as the probe writes it: a sweep of 3e-4, 1e-3 and 3e-3, the `selected` head
    (default 1e-3, inside the grid) at `top1`, the others 5 points below."""
    heads = (
        []
        if top1 is None
        else [
            {
                "lr": lr,
                "weight_decay": 0.1,
                "top1": top1 if lr == selected else top1 - 5,
                "top5": 99.0,
                "heldout_top1": None,
            }
            for lr in (3e-4, 1e-3, 3e-3)
        ]
    )
    return {
        "model": model,
        "benchmark": benchmark,
        "kind": kind,
        "protocol": protocol,
        "selected": {"lr": selected, "weight_decay": 0.1},
        "top1": top1,
        "top5": 99.0,
        "heads": heads,
        "heldout": None,
        "epochs": 1,
        "seed": 0,
    }


def _squeeze(text: str) -> str:
    """Markdown with tabulate's column padding collapsed: `|  a   |` -> `| a |`."""
    return re.sub(r" +", " ", text)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _write_models(tmp: Path) -> None:
    xtra = tmp / "models" / "xtra"
    xtra.mkdir(parents=True)
    # Lightning's CSVLogger: loss and lr on separate rows, NaN elsewhere, extra columns.
    pd.DataFrame(
        {
            "epoch": [0, 0, 0, 0, 1],
            "step": [0, 0, 1, 1, 2],
            "train/loss": [2.0, np.nan, 1.5, np.nan, 1.0],
            "lr-AdamW": [np.nan, 1e-4, np.nan, 5e-4, np.nan],
            "val/loss": [np.nan] * 5,
        }
    ).to_csv(xtra / "log.csv", index=False)
    _write_json(xtra / "metrics.json", {"images_seen": 50_000, "final_loss": 1.0})
    # xtra.train.online's log: a row per head (2 lrs) and kind at each evaluation; lr 0.01 and 0.001 tie at step 4
    (xtra / "online.csv").write_text(
        "step,epoch,images_seen,kind,lr,weight_decay,top1\n"
        "2,0,20000,linear,0.001,0,30.0\n2,0,20000,linear,0.01,0,35.5\n"
        "2,0,20000,attentive,0.001,0,40.0\n2,0,20000,attentive,0.01,0,20.0\n"
        "4,1,40000,linear,0.01,0,50.0\n4,1,40000,linear,0.001,0,50.0\n"
        "4,1,40000,attentive,0.001,0,45.0\n4,1,40000,attentive,0.01,0,61.25\n"
    )
    grid = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    Image.fromarray(grid).save(xtra / "reconstruction.png")
    _write_json(tmp / "models" / "random" / "metrics.json", {"images_seen": 0})


def make_demo(tmp_path: Path) -> dict:
    """Two models, three benchmarks: 5 results, one partial (no top1), one failed, one missing."""
    params = _params(tmp_path, {"in1k": ["attentive", "linear"], "cifar10": ["attentive"], "digits": ["attentive"]})
    probe = tmp_path / "results" / "probe"
    for model, benchmark, kind, top1 in [
        ("xtra", "in1k", "attentive", 80.0),
        ("xtra", "in1k", "linear", 70.0),
        ("xtra", "cifar10", "attentive", 97.0),
        ("xtra", "digits", "attentive", None),
        ("random", "in1k", "attentive", 10.0),
        ("random", "digits", "attentive", 20.0),
    ]:
        _write_json(probe / model / f"{benchmark}-{kind}.json", _result(model, benchmark, kind, top1))
    _write_json(
        probe / "random" / "failures.json",
        {
            "failures": [
                {
                    "job": "in1k-linear",
                    "benchmark": "in1k",
                    "kind": "linear",
                    "error": "RuntimeError: CUDA out of memory",
                    "attempts": 2,
                }
            ]
        },
    )
    _write_models(tmp_path)
    return params


@pytest.fixture
def demo(tmp_path: Path) -> dict:
    return make_demo(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The demo report, built twice into the same folder; the bytes of the first build kept."""
    tmp = tmp_path_factory.mktemp("report")
    params = make_demo(tmp)
    out = tmp / "results"
    build_report(params, out)
    first = {p.relative_to(out): p.read_bytes() for p in _outputs(out)}
    report = build_report(params, out)
    return {"params": params, "out": out, "report": report, "first": first}


def _outputs(out: Path) -> list[Path]:
    return sorted(p for sub in ("tables", "figures", "plots") for p in (out / sub).iterdir()) + [out / "metrics.json"]


def _row(
    table: pd.DataFrame, row: str, model: str, kind: str, protocol: str = "paper", reference: str | None = None
) -> pd.Series:
    sel = (table["row"] == row) & (table["model"] == model) & (table["kind"] == kind) & (table["protocol"] == protocol)
    if reference is not None:
        sel &= table["reference"] == reference
    assert sel.sum() == 1, (row, model, kind, protocol, reference)
    return table[sel].iloc[0]


def test_reference_keeps_published_cells_with_sources():
    ref = load_reference()
    xtra_h = ref[ref["series"] == "XTRA-H/14 (IN-21k)"].set_index("benchmark")
    assert xtra_h.loc["in1k", "top1"] == 80.9 and xtra_h.loc["in1k", "confidence"] == "high"
    assert xtra_h.loc["mean15", "top1"] == 76.2 and xtra_h.loc["mean15", "confidence"] == "low"
    assert set(AIM_TOP1) == set(BENCHMARKS) and AIM_TOP1["in1k"] == 78.5
    assert AIM_TOP1["infograph"] == 45.2
    dino = ref[ref["model"] == "DINO"]
    assert "in1k" not in set(dino["benchmark"])  # an empty published cell is never filled in
    assert (ref["source"] != "").all()
    assert PUBLISHED_IMAGES_SEEN["XTRA-H/14 (IN-21k)"] == pytest.approx(1.31e9)
    assert PUBLISHED_IMAGES_SEEN["XTRA-B/16 (IN-1k)"] == pytest.approx(1.0248e9)


def test_collect_marks_missing_failed_and_partial(demo):
    collected = collect_results(ReportConfig.from_params(demo))
    res = collected.results.set_index(["model", "benchmark", "kind", "protocol"])
    assert len(res) == 8 and (res["status"] == "ok").sum() == 5
    assert set(collected.results["protocol"]) == {"paper"}
    partial = res.loc[("xtra", "digits", "attentive", "paper")]
    assert partial["status"] == "partial" and "digits-attentive.json: no top1" in partial["reason"]
    failed = res.loc[("random", "in1k", "linear", "paper")]
    assert failed["status"] == "failed" and "failures.json" in failed["reason"]
    assert "CUDA out of memory" in failed["reason"]
    missing = res.loc[("random", "cifar10", "attentive", "paper")]
    assert missing["status"] == "missing"
    assert "cifar10-attentive.json: not found" in missing["reason"]
    for row in (partial, failed, missing):
        assert math.isnan(row["top1"])  # missing is NaN, not 0
    assert res.loc[("xtra", "in1k", "attentive", "paper"), ["top1", "lr"]].tolist() == [80.0, 1e-3]
    sweep = collected.sweep.set_index(["model", "benchmark", "kind", "lr"])
    assert len(sweep) == 15
    assert sweep.loc[("xtra", "in1k", "attentive", 1e-3), "selected"]
    assert not sweep.loc[("xtra", "in1k", "attentive", 3e-3), "selected"]
    assert sweep.loc[("xtra", "in1k", "attentive", 3e-3), "top1"] == 75.0


def test_protocol_is_a_column(tmp_path):
    params = _params(tmp_path, {"digits": ["linear"], "mnist": ["linear"]}, models=("m",), protocol="heldout")
    probe = tmp_path / "results" / "probe" / "m"
    _write_json(probe / "digits-linear.json", _result("m", "digits", "linear", 91.0, "heldout"))
    # a file of the other protocol is no result of these params: stale, with the reason, in no table
    _write_json(probe / "mnist-linear.json", _result("m", "mnist", "linear", 99.0, "paper"))
    collected = collect_results(ReportConfig.from_params(params))
    res = collected.results.set_index(["benchmark", "protocol"])
    assert res.loc[("digits", "heldout"), "top1"] == 91.0
    assert ("mnist", "paper") not in res.index
    assert res.loc[("mnist", "heldout"), "status"] == "stale"
    assert "made by the paper protocol, params say heldout" in res.loc[("mnist", "heldout"), "reason"]
    table = results_table(collected.results, load_reference(), collected.benchmarks, [])
    assert _row(table, "run", "m", "linear", "heldout")["digits"] == 91.0
    assert math.isnan(_row(table, "run", "m", "linear", "heldout")["mnist"])
    assert "| run | m | linear | heldout |" in _squeeze(to_markdown(table, collected.results))


def test_only_the_declared_results_are_read_and_a_result_of_another_model_is_stale(tmp_path):
    """The stage table's outputs for these params, not every JSON on disk: a removed benchmark's, a model
    outside probe.models, a stray folder are not read; a result whose recorded model identity is not
    the identity in the model's metrics.json is `stale` and enters no mean or sweep."""
    params = _params(tmp_path, {"digits": ["linear"]}, models=("m", "other"))
    params["probe"]["models"] = ["m"]
    probe = tmp_path / "results" / "probe"
    _write_json(probe / "m" / "digits-linear.json", {**_result("m", "digits", "linear", 91.0), "model_identity": "a"})
    _write_json(probe / "m" / "removed-linear.json", _result("m", "removed", "linear", 50.0))
    _write_json(probe / "other" / "digits-linear.json", _result("other", "digits", "linear", 10.0))
    _write_json(probe / "gone" / "digits-linear.json", _result("gone", "digits", "linear", 10.0))
    _write_json(tmp_path / "models" / "m" / "metrics.json", {"identity": "a", "images_seen": 0})
    collected = collect_results(ReportConfig.from_params(params))
    assert collected.results[["model", "benchmark", "status"]].values.tolist() == [["m", "digits", "ok"]]
    assert collected.models == ["m"] and "removed" not in collected.benchmarks
    _write_json(tmp_path / "models" / "m" / "metrics.json", {"identity": "b", "images_seen": 0})  # retrained
    collected = collect_results(ReportConfig.from_params(params))
    row = collected.results.iloc[0]
    assert row["status"] == "stale" and math.isnan(row["top1"]) and collected.sweep.empty
    assert "made from model identity a, but" in row["reason"] and "metrics.json is b" in row["reason"]


def test_the_report_reads_the_stage_tables_outputs():
    """The results it expects are exactly the probe stages' outputs of the demo's params."""
    from xtra.config import load_params
    from xtra.pipeline.dag import stage_table
    from xtra.report.collect import _expected

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml", check_paths=False)
    cfg = ReportConfig.from_params(params)
    declared = {o for s in stage_table(params) if s.kind == "probe" for o in s.outs}
    assert {f"{cfg.results}/probe/{m}/{b}-{k}.json" for m, b, k, _ in _expected(cfg)} == declared


def test_table_holds_expected_numbers(built):
    table = pd.read_csv(built["out"] / "tables" / "top1.csv", keep_default_na=True)
    table["reference"] = table["reference"].fillna("")
    assert list(table.columns[5:22]) == [*BENCHMARKS, "digits", "mean15"]
    r = _row(table, "run", "xtra", "attentive")
    assert (r["in1k"], r["cifar10"]) == (80.0, 97.0) and math.isnan(r["digits"])
    assert math.isnan(r["mean15"]) and r["mean_present"] == pytest.approx(88.5)
    assert r["n_present"] == 2 and math.isnan(r["inat18"])
    r = _row(table, "run", "xtra", "linear")
    assert r["in1k"] == 70.0 and r["mean_present"] == 70.0 and r["n_present"] == 1
    r = _row(table, "run", "random", "attentive")
    assert r["mean_present"] == pytest.approx(15.0) and math.isnan(r["cifar10"])
    r = _row(table, "run", "random", "linear")
    assert math.isnan(r["in1k"]) and math.isnan(r["mean_present"]) and r["n_present"] == 0
    pub = _row(table, "published", "AIM-0.6B (DFN-2B+)", "attentive")
    assert [pub[b] for b in BENCHMARKS] == [AIM_TOP1[b] for b in BENCHMARKS]
    assert pub["mean15"] == 75.6 and math.isnan(pub["digits"])  # demo benchmark: no number
    assert pub["mean_present"] == pytest.approx(75.64) and pub["n_present"] == 15
    pub = _row(table, "published", "XTRA-H/14 (IN-21k)", "attentive")
    assert pub["in1k"] == 80.9 and pub["mean15"] == 76.2 and "low" in pub["source"]
    assert _row(table, "published", "XTRA-B/16 (IN-1k)", "linear")["in1k"] == 70.2
    assert _row(table, "published", "AIM-0.6B (IN-1k)", "attentive")["mean15"] == 73.5
    d = _row(table, "difference", "xtra", "attentive", reference="AIM-0.6B (DFN-2B+)")
    assert d["in1k"] == pytest.approx(1.5) and d["cifar10"] == pytest.approx(-0.2)
    assert d["mean_present"] == pytest.approx(88.5 - (78.5 + 97.2) / 2) and d["n_present"] == 2
    assert math.isnan(d["digits"]) and math.isnan(d["mean15"]) and math.isnan(d["inat18"])
    d = _row(table, "difference", "xtra", "attentive", reference="XTRA-H/14 (IN-21k)")
    assert d["in1k"] == pytest.approx(-0.9) and math.isnan(d["mean_present"])
    d = _row(table, "difference", "xtra", "linear", reference="XTRA-B/16 (IN-1k)")
    assert d["in1k"] == pytest.approx(-0.2) and d["mean_present"] == pytest.approx(-0.2)
    d = _row(table, "difference", "random", "attentive", reference="XTRA-B/16 (IN-1k)")
    assert d["in1k"] == pytest.approx(-66.8) and math.isnan(d["mean_present"])
    # no difference where nothing is comparable: AIM's mean-only series vs a run without mean15
    diffs = table[table["row"] == "difference"]
    assert len(diffs) == 7 and "AIM-0.6B (DFN-2B)" not in set(diffs["reference"])
    assert not ((diffs["model"] == "random") & (diffs["kind"] == "linear")).any()
    assert set(table["protocol"]) == {"paper"}


def test_mean_over_15_and_differences(tmp_path):
    params = _params(tmp_path, {b: ["attentive"] for b in BENCHMARKS}, models=("h14",))
    for b in BENCHMARKS:
        _write_json(
            tmp_path / "results" / "probe" / "h14" / f"{b}-attentive.json",
            _result("h14", b, "attentive", AIM_TOP1[b] + 1.0),
        )
    collected = collect_results(ReportConfig.from_params(params))
    table = results_table(
        collected.results, load_reference(), collected.benchmarks, ["XTRA-B/16", "XTRA-H/14", "AIM-0.6B"]
    )
    run_row = _row(table, "run", "h14", "attentive")
    assert run_row["mean15"] == pytest.approx(75.64 + 1.0)
    assert run_row["mean_present"] == pytest.approx(76.64) and run_row["n_present"] == 15
    d = _row(table, "difference", "h14", "attentive", reference="AIM-0.6B (DFN-2B+)")
    assert [d[b] for b in BENCHMARKS] == pytest.approx([1.0] * 15)
    assert d["mean15"] == pytest.approx(76.64 - 75.6)
    assert d["mean_present"] == pytest.approx(1.0) and d["n_present"] == 15
    d = _row(table, "difference", "h14", "attentive", reference="XTRA-H/14 (IN-21k)")
    assert d["in1k"] == pytest.approx(79.5 - 80.9) and d["mean15"] == pytest.approx(76.64 - 76.2)
    assert math.isnan(d["mean_present"]) and math.isnan(d["inat18"])
    d = _row(table, "difference", "h14", "attentive", reference="AIM-0.6B (IN-1k)")
    assert d["mean15"] == pytest.approx(76.64 - 73.5)
    # one benchmark missing: no mean over the 15, the mean over the 14 present instead
    (tmp_path / "results" / "probe" / "h14" / "rxrx1-attentive.json").unlink()
    collected = collect_results(ReportConfig.from_params(params))
    run_row = run_rows(collected.results, collected.benchmarks).iloc[0]
    assert math.isnan(run_row["mean15"]) and run_row["n_present"] == 14
    assert run_row["mean_present"] == pytest.approx(np.mean([AIM_TOP1[b] + 1 for b in BENCHMARKS if b != "rxrx1"]))


def test_markdown_and_latex_show_missing_with_reason(built):
    md = _squeeze((built["out"] / "tables" / "top1.md").read_text())
    assert "| run | random | attentive | paper | | 10.0 | — | — |" in md
    assert "- random / cifar10 / attentive / paper: missing (" in md
    assert "- xtra / digits / attentive / paper: partial (" in md
    assert "- random / in1k / linear / paper: failed (" in md and "CUDA out of memory" in md
    assert "| difference | xtra | attentive | paper | AIM-0.6B (DFN-2B+) | +1.5 | — | -0.2 |" in md
    assert " 0.0 " not in md
    tex = (built["out"] / "tables" / "top1.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and tex.count("\\midrule") == 3
    assert "run & xtra & attentive & paper &  & 80.0 & -- & 97.0 &" in tex
    assert "\\dagger" not in tex.split("\n", 1)[1]  # no lr at an edge of its grid here
    assert "$-0.2$" in tex and "mean\\_present" in tex


def test_metrics_and_plot_data(built):
    out = built["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["xtra"]["attentive"]["paper"] == {
        "in1k": 80.0,
        "cifar10": 97.0,
        "mean_present": 88.5,
        "n_present": 2,
    }
    assert metrics["random"]["linear"]["paper"] == {"n_present": 0}
    top1 = pd.read_csv(out / "plots" / "top1.csv")
    assert len(top1) == 5 and "xtra/attentive/paper/in1k" in set(top1["key"])
    sweep = pd.read_csv(out / "plots" / "sweep.csv")
    assert len(sweep) == 15 and {"key", "lr", "top1", "selected"} <= set(sweep.columns)
    loss = pd.read_csv(out / "plots" / "loss.csv")
    assert loss["loss"].tolist() == [2.0, 1.5, 1.0] and loss["lr"].tolist()[:2] == [1e-4, 5e-4]
    seen = pd.read_csv(out / "plots" / "images_seen.csv")
    assert set(seen.loc[seen["origin"] == "published", "series"]) == {
        "XTRA-B/16 (IN-1k)",
        "XTRA-H/14 (IN-21k)",
        "AIM-0.6B (DFN-2B+)",
    }
    run_points = seen[seen["origin"] == "run"]
    assert set(run_points["images_seen"]) == {50_000} and len(run_points) == 4


def test_online_probes_along_training_are_a_figure_and_plot_data_of_their_own(built, tmp_path):
    """The best head of each kind at each evaluation (a tie: the smaller lr), against images seen, on axes of
    their own (no published point); a trained model without online probes is named under the figure."""
    online = pd.read_csv(built["out"] / "plots" / "online.csv")
    assert list(online.columns) == ["model", "step", "images_seen", "kind", "lr", "top1"]
    best = {(r.kind, r.step): (r.lr, r.top1) for r in online.itertuples()}
    assert set(online["model"]) == {"xtra"} and len(online) == 4
    assert best == {
        ("attentive", 2): (0.001, 40.0),
        ("linear", 2): (0.01, 35.5),
        ("attentive", 4): (0.01, 61.25),
        ("linear", 4): (0.001, 50.0),
    }
    fig = built["report"].figures["online_top1"]
    attentive, linear = fig.axes
    assert attentive.get_title() == "online attentive probe (best lr)"
    assert [list(line.get_ydata()) for line in linear.get_lines()] == [[35.5, 50.0]]
    assert list(attentive.get_lines()[0].get_xdata()) == [20_000, 40_000]
    assert not fig.get_supxlabel()  # random is a control, not a trained model: nothing to say
    params = make_demo(tmp_path)
    (tmp_path / "models" / "xtra" / "online.csv").unlink()
    report = build_report(params, tmp_path / "results")
    assert "xtra (" in report.figures["online_top1"].get_supxlabel()
    assert "online.csv not found" in report.figures["online_top1"].get_supxlabel()
    assert report.identity != built["report"].identity  # the online log is one of the report's inputs


def test_a_malformed_online_log_names_the_file(tmp_path):
    from xtra.report.collect import read_online_log

    path = tmp_path / "online.csv"
    path.write_text("step,kind,top1\n2,linear,30\n")
    with pytest.raises(XtraError, match=r"online.csv: online probe log lacks column\(s\) images_seen, lr"):
        read_online_log(path)


def test_outputs_are_byte_identical_on_rerun(built):
    again = {p.relative_to(built["out"]): p.read_bytes() for p in _outputs(built["out"])}
    assert again.keys() == built["first"].keys()
    assert {p.suffix for p in again} == {".csv", ".md", ".tex", ".png", ".pdf", ".json"}
    changed = [str(p) for p in again if again[p] != built["first"][p]]
    assert not changed


def _png_is_drawn(path: Path) -> bool:
    image = np.asarray(Image.open(path).convert("L"))
    return image.size > 10_000 and len(np.unique(image)) > 2


def test_figures_have_expected_panels_and_series(built):
    figs = built["report"].figures
    attentive, linear = figs["top1_bars"].axes
    # this run's benchmarks only, a bar series per model: the published numbers are elsewhere
    assert len(attentive.containers) == 2 and len(linear.containers) == 2
    assert [t.get_text() for t in attentive.get_xticklabels()] == ["in1k", "cifar10", "digits"]
    heights = [b.get_height() for b in attentive.containers[0]]
    assert heights[:2] == [80.0, 97.0] and np.isnan(heights[2])
    # each bar labelled with its value; a missing one is a gap, with no `n/a` or `nan` label
    assert [t.get_text() for t in attentive.texts] == ["80.0", "97.0", "", "10.0", "", "20.0"]
    footnote = figs["top1_bars"].get_supxlabel()
    assert "random/cifar10/attentive (missing" in footnote
    assert "xtra/digits/attentive (partial" in footnote and "CUDA out of memory" in footnote
    p_attentive, p_linear = figs["paper_comparison"].axes
    # this run's 2 models + XTRA-B/16, XTRA-H/14 and AIM-0.6B's 3 series with a number there
    assert len(p_attentive.containers) == 7 and len(p_linear.containers) == 2  # random: no linear
    assert [t.get_text() for t in p_attentive.get_xticklabels()] == [*BENCHMARKS, "mean15"]
    assert "(published)" in p_attentive.get_legend().get_texts()[-1].get_text()
    sweep = figs["lr_sweep"].axes
    assert [ax.get_title() for ax in sweep] == ["in1k", "cifar10", "digits"]
    assert [len(ax.get_lines()) for ax in sweep] == [3, 1, 1]
    loss_ax, lr_ax = figs["pretrain_loss"].axes
    assert len(loss_ax.get_lines()) == 1 and list(loss_ax.get_lines()[0].get_ydata()) == [2, 1.5, 1]
    assert len(lr_ax.get_lines()) == 1
    assert "random (random-init control: not trained)" in figs["pretrain_loss"].get_supxlabel()
    mean_ax, in1k_ax = figs["images_seen"].axes
    assert len(mean_ax.get_lines()) == 4 and len(in1k_ax.get_lines()) == 5
    rec_xtra, rec_random = figs["reconstruction"].axes
    assert len(rec_xtra.images) == 1 and rec_xtra.images[0].get_array().shape[:2] == (48, 64)
    assert not rec_random.images and "not written" in rec_random.texts[0].get_text()
    assert rec_random.get_title().endswith("untrained)")
    for name in figs:
        assert _png_is_drawn(built["out"] / "figures" / f"{name}.png")
        assert (built["out"] / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")


def test_bars_figure_counts_series_per_kind():
    table = pd.DataFrame(
        {
            "row": ["run", "run", "floor"],
            "model": ["a", "a", "px"],
            "kind": ["linear", "attentive", "linear"],
            "protocol": ["paper"] * 3,
            "x": [1.0, np.nan, 3.0],
        }
    )
    fig = bars_figure(table, ["x"], {"a/x/attentive": "missing: not found"})
    assert [len(ax.containers) for ax in fig.axes] == [1, 1]
    # the pixel floor: a dashed segment in every panel, labelled as the floor
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "px linear (pixel floor)" in labels
    assert "a/x/attentive (missing: not found)" in fig.get_supxlabel()


def _floor_demo(tmp_path: Path, k2_mnist: float = 64.7) -> dict:
    """A demo-shaped run: a pre-trained model, its random control, and the pixel floor."""
    params = _params(
        tmp_path,
        {"mnist": ["linear", "attentive"], "digits": ["linear", "attentive"]},
        models=("xtra_k2", "random", "pixels"),
    )
    params["models"]["pixels"]["init"] = "pixels"
    probe = tmp_path / "results" / "probe"
    for model, bench, kind, top1 in [
        ("xtra_k2", "mnist", "linear", k2_mnist),
        ("xtra_k2", "mnist", "attentive", 62.0),
        ("xtra_k2", "digits", "linear", 83.8),
        ("xtra_k2", "digits", "attentive", 84.4),
        ("random", "mnist", "linear", 44.1),
        ("random", "mnist", "attentive", 54.5),
        ("random", "digits", "linear", 69.6),
        ("random", "digits", "attentive", 71.6),
        ("pixels", "mnist", "linear", 89.9),
        ("pixels", "digits", "linear", 95.0),
    ]:
        _write_json(probe / model / f"{bench}-{kind}.json", _result(model, bench, kind, top1))
    return params


def test_pixel_floor_row_and_gap_to_it(tmp_path):
    params = _floor_demo(tmp_path)
    report = build_report(params, tmp_path / "results")
    results = report.collected.results
    # the floor is probed by the linear kind only: no attentive result is expected of it
    assert set(results.loc[results["model"] == "pixels", "kind"]) == {"linear"}
    assert (results["status"] == "ok").all()
    table = pd.read_csv(tmp_path / "results" / "tables" / "top1.csv")
    table["reference"] = table["reference"].fillna("")
    floor = _row(table, "floor", "pixels", "linear")
    assert (floor["mnist"], floor["digits"]) == (89.9, 95.0)
    assert not ((table["row"] == "run") & (table["model"] == "pixels")).any()
    gap = _row(table, "difference", "xtra_k2", "linear", reference="pixels (pixel floor)")
    assert gap["mnist"] == pytest.approx(64.7 - 89.9) and gap["digits"] == pytest.approx(-11.2)
    gap = _row(table, "difference", "random", "linear", reference="pixels (pixel floor)")
    assert gap["mnist"] == pytest.approx(44.1 - 89.9)
    # no attentive floor: no attentive difference against it
    assert not ((table["reference"] == "pixels (pixel floor)") & (table["kind"] == "attentive")).any()
    md = _squeeze((tmp_path / "results" / "tables" / "top1.md").read_text())
    assert "| floor | pixels | linear | paper | | — |" in md and "Row `floor`: the pixel floor" in md
    assert "| difference | xtra_k2 | linear | paper | pixels (pixel floor) |" in md
    assert report.metrics["pixels"]["linear"]["paper"]["mnist"] == 89.9
    figs = report.figures
    for ax in figs["top1_bars"].axes:  # the floor in both kinds' panels, never a bar of its own
        assert "pixels linear (pixel floor)" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(ax.containers) == 2
    mnist_sweep = figs["lr_sweep"].axes[0]
    assert "pixels linear (pixel floor)" in [t.get_text() for t in mnist_sweep.get_legend().get_texts()]
    assert [ax.get_title().split(" ")[0] for ax in figs["reconstruction"].axes] == ["xtra_k2", "random"]
    assert "pixels (pixel floor: no encoder, not trained)" in figs["pretrain_loss"].get_supxlabel()


def test_lr_at_the_edge_of_its_grid_is_marked_and_warned(tmp_path, capsys):
    params = _floor_demo(tmp_path)
    probe = tmp_path / "results" / "probe"
    _write_json(
        probe / "xtra_k2" / "mnist-linear.json", _result("xtra_k2", "mnist", "linear", 64.7, selected=3e-3)
    )  # the largest lr
    _write_json(
        probe / "random" / "digits-attentive.json", _result("random", "digits", "attentive", 71.6, selected=3e-4)
    )  # the smallest
    report = build_report(params, tmp_path / "results")
    res = report.collected.results.set_index(["model", "benchmark", "kind"])
    assert res.loc[("xtra_k2", "mnist", "linear"), ["lr_edge", "lr_grid"]].tolist() == ["high", "0.0003..0.003"]
    assert res.loc[("random", "digits", "attentive"), "lr_edge"] == "low"
    assert (res["lr_edge"] != "").sum() == 2
    table = pd.read_csv(tmp_path / "results" / "tables" / "top1.csv", keep_default_na=False)
    assert _row(table, "run", "xtra_k2", "linear")["lr_at_edge"] == "mnist:high"
    assert _row(table, "run", "xtra_k2", "attentive")["lr_at_edge"] == ""
    md = _squeeze((tmp_path / "results" / "tables" / "top1.md").read_text())
    assert "| run | xtra_k2 | linear | paper | | — |" in md
    assert "| 64.7† |" in md and "| 71.6† |" in md and md.count("†") == 3  # 2 cells + the note
    assert (
        "- xtra_k2 / mnist / linear / paper: lr 0.003 is the largest of the grid "
        "0.0003..0.003; the optimum may lie beyond it"
    ) in md
    assert "- random / digits / attentive / paper: lr 0.0003 is the smallest" in md
    tex = (tmp_path / "results" / "tables" / "top1.tex").read_text()
    assert "64.7$^\\dagger$" in tex
    assert "2 of 10 selections" in report.figures["lr_sweep"].get_supxlabel()
    # the command prints each as a warning line
    fake = types.ModuleType("xtra.config")
    fake.load_params = lambda path: params
    sys.modules_backup = sys.modules.get("xtra.config")
    try:
        sys.modules["xtra.config"] = fake
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        assert run(parser.parse_args(["--readme", ""])) == 0
    finally:
        sys.modules.pop("xtra.config")
        if sys.modules_backup is not None:
            sys.modules["xtra.config"] = sys.modules_backup
    err = capsys.readouterr().err
    assert "warning: xtra_k2 / mnist / linear / paper: lr 0.003 is the largest" in err
    assert err.count("warning: ") == 2


def test_paper_figure_says_when_the_run_has_none_of_its_benchmarks(tmp_path):
    report = build_report(_floor_demo(tmp_path), tmp_path / "results")
    fig = report.figures["paper_comparison"]
    assert "this run probes none of these benchmarks (it probes mnist, digits" in fig.get_supxlabel()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert labels and all(label.endswith("(published)") for label in labels)
    for ax in fig.axes:
        assert "mnist" not in [t.get_text() for t in ax.get_xticklabels()]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"top1": "high"}', '{"top1": 1.0, "heads": {"lr": 1}}'])
def test_malformed_result_names_the_file(demo, content):
    bad = Path(demo["paths"]["results"]) / "probe" / "xtra" / "digits-attentive.json"
    bad.write_text(content)
    with pytest.raises(XtraError, match=str(bad)):
        collect_results(ReportConfig.from_params(demo))


def test_malformed_failures_and_metrics_name_the_file(demo, tmp_path):
    failures = Path(demo["paths"]["results"]) / "probe" / "random" / "failures.json"
    failures.write_text('[{"error": "no job named"}]')
    with pytest.raises(XtraError, match=str(failures)):
        collect_results(ReportConfig.from_params(demo))
    failures.write_text('{"in1k-linear": "killed"}')
    failed = collect_results(ReportConfig.from_params(demo)).results.query("status == 'failed'")
    assert "killed" in failed["reason"].iloc[0]
    metrics = tmp_path / "models" / "xtra" / "metrics.json"
    metrics.write_text("{")
    with pytest.raises(XtraError, match=str(metrics)):
        build_report(demo, tmp_path / "results")


def test_pretrain_log_accepts_both_loss_names(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss,lr,extra\n0,3.0,0.1,\n1,,0.2,x\n2,1.0,,\n")
    log = read_pretrain_log(path)
    assert log["step"].tolist() == [0, 1, 2] and log["loss"].tolist()[0::2] == [3.0, 1.0]
    assert math.isnan(log["loss"][1]) and log["lr"].tolist()[:2] == [0.1, 0.2]
    path.write_text("step,val/acc\n0,1\n")
    with pytest.raises(XtraError, match=str(path)):
        read_pretrain_log(path)


def test_readme_table_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\nrest\n")
    assert update_readme(readme, "| a |\n|---|\n")
    assert readme.read_text() == f"# x\n\n{MARKERS[0]}\n| a |\n|---|\n{MARKERS[1]}\n\nrest\n"
    assert update_readme(readme, "| a |\n|---|\n")  # idempotent
    assert readme.read_text().count("| a |") == 1
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| a |\n") and plain.read_text() == "no markers\n"


def _cli_params(tmp_path: Path) -> dict:
    params = _params(tmp_path, {"digits": ["linear"]}, models=("xtra",))
    params["report"].update({"figure_formats": ["png"], "dpi": 40})
    _write_json(
        tmp_path / "results" / "probe" / "xtra" / "digits-linear.json", _result("xtra", "digits", "linear", 88.0)
    )
    return params


def test_cli_runs_and_fills_the_readme(tmp_path, monkeypatch, capsys):
    params = _cli_params(tmp_path)
    fake = types.ModuleType("xtra.config")
    fake.load_params = lambda path: params if str(path) == "p.yaml" else pytest.fail(path)
    monkeypatch.setitem(sys.modules, "xtra.config", fake)
    readme = tmp_path / "README.md"
    readme.write_text(f"{MARKERS[0]}\n{MARKERS[1]}\n")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args([]).params == "params.yaml"
    assert run(parser.parse_args(["--params", "p.yaml", "--readme", str(readme)])) == 0
    text = _squeeze(readme.read_text())
    assert "| run | xtra | linear | paper |" in text and "| 88.0 |" in text
    assert (tmp_path / "results" / "figures" / "top1_bars.png").is_file()
    assert not (tmp_path / "results" / "figures" / "top1_bars.pdf").exists()
    bad = tmp_path / "results" / "probe" / "xtra" / "digits-linear.json"
    bad.write_text("{oops")
    assert xtra_main(["report", "--params", "p.yaml", "--readme", ""]) == 2
    assert f"error: {bad}: malformed JSON" in capsys.readouterr().err
