"""`xtra report`: probe results -> tables, figures, DVC metrics and plot data.

Reads `<paths.results>/probe/<model>/*.json` and `<paths.models>/<model>/{log.csv,online.csv,metrics.json,
reconstruction.png}`; writes under the results folder (`out`):

    tables/top1.{csv,md,tex}     run, published and difference rows (see xtra.report.tables)
    tables/results_long.csv      one row per model/benchmark/kind/protocol, with status and reason
    tables/published.csv         every published cell shipped, with its source and confidence
    figures/<name>.{png,pdf}     top1_bars (this run's benchmarks, the pixel floor a dashed line),
                                 paper_comparison (the published numbers), lr_sweep,
                                 pretrain_loss, online_top1 (online probes along training: their own
                                 axes, no benchmark's), images_seen, reconstruction
    metrics.json                 {"identity": <the report's identity>, model: {kind: {protocol:
                                 {<benchmark>|mean15|mean_present|n_present: value}}}}
    plots/{top1,sweep,loss,online,images_seen}.csv   long-format plot data for `dvc plots`

and nothing else: only when `--readme FILE` is given (by hand, never by the pipelines) does it paste
the Markdown table between the two markers of FILE.
A missing/partial result and a selected lr at the edge of its grid are each a `warning:` line on
stderr (and a line under the Markdown table); so is a table whose cells come from mixed environments
(thread count, ranks, device, torch: `xtra.report.environments`), which also gets a column `environment`.

Params read, once, into the stage's typed config (`xtra.report.config.ReportConfig`): `paths.results`,
`paths.models`, `models`, `probe.benchmarks` (kinds), `probe.protocol` and the `report` section:
`reference_models` (published models beside this run), `reference_dir` (null: the package's
`reference/`), `figure_formats` and `dpi` (their defaults are the schema's).
Every file is written atomically and only from sorted, formatted data, so an unchanged input
gives byte-identical outputs: a re-run of a finished report rewrites the same bytes. Its identity
(`xtra.identity.stage_identity`: the report recipe version, its keys, the identities of the results
and models it read and the published numbers) is in metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from xtra.atomic import sha256_file, write_atomic
from xtra.config import params_hash, section_defaults
from xtra.errors import XtraError
from xtra.identity import key_values, stage_identity, stage_keys
from xtra.report import figures, tables
from xtra.report.collect import (
    ONLINE_COLUMNS,
    Collected,
    collect_results,
    read_images_seen,
    read_json,
    read_model_identity,
    read_online_log,
    read_pretrain_environments,
    read_pretrain_log,
)
from xtra.report.config import ReportConfig
from xtra.report.environments import Mixed, mark_table, mixed_environments
from xtra.report.reference import BENCHMARKS, load_reference

__all__ = ["MARKERS", "Report", "build_report", "update_readme", "configure_parser", "run"]

MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


@dataclass
class Report:
    """What `build_report` made: the frames, the Markdown, the metrics, the figures, the files."""

    collected: Collected
    table: pd.DataFrame
    markdown: str
    metrics: dict
    identity: str = ""
    mixed: Mixed | None = None  # the environments of its cells differ (xtra.report.environments)
    figures: dict[str, Figure] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _write(path: Path, data: str | bytes) -> Path:
    """Write atomically (a temporary file beside it, then rename), keeping an old file's mode."""
    try:
        write_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise XtraError(f"{path}: cannot write: {exc}") from exc
    return path


_NOT_TRAINED = {"random": "random-init control: not trained", "pixels": "pixel floor: no encoder, not trained"}


def _inits(cfg: ReportConfig, models: list[str]) -> dict[str, str]:
    """Each model's init (a model found on disk but not in params: pretrain)."""
    return {m: cfg.models[m].init if m in cfg.models else "pretrain" for m in models}


def _model_inputs(cfg: ReportConfig, models: list[str]) -> tuple[dict, dict, dict, dict]:
    """Each model's pre-training log and images seen, with why either is missing."""
    models_dir = cfg.models_dir
    inits = _inits(cfg, models)
    logs, no_log, seen, not_seen = {}, {}, {}, {}
    for model in models:
        if inits[model] in _NOT_TRAINED:
            no_log[model] = not_seen[model] = _NOT_TRAINED[inits[model]]
            seen[model] = None
            continue
        log = models_dir / model / "log.csv"
        frame = read_pretrain_log(log) if log.is_file() else None
        if frame is not None and not frame.empty:
            logs[model] = frame
        elif frame is not None:
            no_log[model] = f"{log} has no logged step"
        else:
            no_log[model] = f"{log} not found"
        value, why = read_images_seen(models_dir, model)
        seen[model] = value
        if value is None or value <= 0:
            not_seen[model] = why or "images_seen is 0 (not pre-trained)"
    return logs, no_log, seen, not_seen


def _online_inputs(cfg: ReportConfig, models: list[str]) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Each trained model's online probe log (`read_online_log`: the best head per kind and evaluation),
    and why a trained model has none."""
    inits = _inits(cfg, models)
    online, missing = {}, {}
    for model in models:
        if inits[model] != "pretrain":
            continue
        path = cfg.models_dir / model / "online.csv"
        frame = read_online_log(path) if path.is_file() else None
        if frame is not None and len(frame):
            online[model] = frame
        else:
            missing[model] = f"{path} has no evaluation" if frame is not None else f"{path} not found"
    return online, missing


def _not_shown(results: pd.DataFrame) -> dict[str, str]:
    """ "model/benchmark/kind" -> status (reason) of every expected result that is not there."""
    bad = results[results["status"] != "ok"]
    return {f"{r['model']}/{r['benchmark']}/{r['kind']}": f"{r['status']}: {r['reason']}" for _, r in bad.iterrows()}


def _reconstructions(cfg: ReportConfig, collected: Collected) -> tuple[dict, dict]:
    """Every model with an encoder (the pixel floor has none): its reconstruction.png, a title."""
    inits = _inits(cfg, collected.models)
    images, titles = {}, {}
    for model in collected.models:
        if model in collected.floor_models:
            continue
        images[model] = cfg.models_dir / model / "reconstruction.png"
        known = cfg.models.get(model)
        k, order = (known.block_size, known.block_order) if known else ("?", "raster")
        titles[model] = f"{model} (k = {k}, {order} order" + (", untrained)" if inits[model] == "random" else ")")
    return images, titles


def _figures(cfg: ReportConfig, report: Report, reference: pd.DataFrame) -> tuple[dict, dict]:
    """All figures, and the plot-data frames that go with them."""
    collected, table = report.collected, report.table
    run_benchmarks = [b for b in collected.benchmarks if b in set(collected.results["benchmark"])]
    own = table[table["row"].isin(list(tables.OWN_ROWS))]
    paper_columns = [*BENCHMARKS, "mean15"]
    paper_rows = table[table["row"].isin(["run", "published"])]
    logs, no_log, seen, not_seen = _model_inputs(cfg, collected.models)
    online, no_online = _online_inputs(cfg, collected.models)
    points = tables.images_seen_frame(table[table["row"] == "run"], seen, reference)
    images, titles = _reconstructions(cfg, collected)
    edges = [line.removeprefix("- ").split(": lr ")[0] for line in tables.edge_lines(collected.results)]
    figs = {
        "top1_bars": figures.bars_figure(own, run_benchmarks, _not_shown(collected.results)),
        "paper_comparison": figures.paper_figure(paper_rows, paper_columns, run_benchmarks),
        "lr_sweep": figures.sweep_figure(collected.sweep, collected.floor_models, edges),
        "pretrain_loss": figures.loss_figure(logs, no_log),
        "online_top1": figures.online_figure(online, no_online),
        "images_seen": figures.images_seen_figure(points, not_seen, table[table["row"] == "floor"]),
        "reconstruction": figures.reconstruction_figure(images, titles),
    }
    loss = (
        pd.concat([log.assign(model=m) for m, log in logs.items()], ignore_index=True)
        if logs
        else pd.DataFrame(columns=["step", "loss", "lr", "model"])
    )
    online_points = (
        pd.concat([frame.assign(model=m) for m, frame in online.items()], ignore_index=True)
        if online
        else pd.DataFrame(columns=["model", *ONLINE_COLUMNS])
    )
    plots = {
        "loss": loss[["model", "step", "loss", "lr"]],
        "online": online_points[["model", *ONLINE_COLUMNS]],
        "images_seen": points,
    }
    return figs, plots


def _plot_frames(collected: Collected) -> dict[str, pd.DataFrame]:
    ok = collected.results[collected.results["status"] == "ok"]
    top1 = ok[["model", "kind", "protocol", "benchmark", "top1"]].copy()
    top1.insert(0, "key", top1["model"] + "/" + top1["kind"] + "/" + top1["protocol"] + "/" + top1["benchmark"])
    sweep = collected.sweep.copy()
    sweep.insert(0, "key", sweep["model"] + "/" + sweep["benchmark"] + "/" + sweep["kind"])
    return {"top1": top1, "sweep": sweep}


def _write_tables(out: Path, report: Report, reference: pd.DataFrame) -> list[Path]:
    folder = out / "tables"
    return [
        _write(folder / "top1.csv", tables.to_csv(report.table)),
        _write(folder / "top1.md", report.markdown),
        _write(folder / "top1.tex", tables.to_latex(report.table)),
        _write(folder / "results_long.csv", tables.to_csv(report.collected.results)),
        _write(folder / "published.csv", tables.to_csv(reference)),
        _write(out / "metrics.json", json.dumps({"identity": report.identity, **report.metrics}, indent=2) + "\n"),
    ]


def report_identity(params: dict, cfg: ReportConfig, collected: Collected, reference: pd.DataFrame) -> str:
    """The report's identity: its recipe version and keys, the identity of every result and model it read
    (a result file written without one: its bytes' sha256), each online probe log's sha256 (a model's
    identity does not cover its online heads, which change none of its weights), and the published numbers."""
    filled = {
        **params,
        "probe": {**section_defaults("probe"), **params["probe"]},
        "report": {**section_defaults("report"), **(params.get("report") or {})},
    }
    results = {}
    for _, row in collected.results.iterrows():
        data = read_json(Path(row["file"])) if row["status"] == "ok" else {}
        results[f"{row['model']}/{row['benchmark']}-{row['kind']}"] = data.get("identity") or (
            params_hash(data) if data else row["status"]
        )
    inputs = {
        "results": results,
        "models": {m: read_model_identity(cfg.models_dir, m) for m in collected.models},
        "online": {
            m: sha256_file(path) for m in collected.models if (path := cfg.models_dir / m / "online.csv").is_file()
        },
        "reference": params_hash(tables.to_csv(reference)),
    }
    return stage_identity("report", key_values(filled, stage_keys(filled, "report")), inputs)


def build_report(params: dict, out: Path) -> Report:
    """Collect the probe results of `params` (its typed config, built here); write every table, figure
    and metric under `out`."""
    out = Path(out)
    cfg = ReportConfig.from_params(params)
    reference = load_reference(cfg.reference_dir)
    collected = collect_results(cfg)
    table = tables.results_table(
        collected.results, reference, collected.benchmarks, list(cfg.reference_models), collected.floor_models
    )
    run_table = table[table["row"].isin(list(tables.OWN_ROWS))]
    trained = {m: read_pretrain_environments(cfg.models_dir, m) for m in collected.models}
    mixed = mixed_environments(collected.results, trained)
    table = mark_table(table, collected.results, trained, mixed)
    markdown = tables.to_markdown(table, collected.results)
    report = Report(
        collected=collected,
        table=table,
        markdown=markdown if mixed is None else f"{markdown}\n{mixed.note()}\n",
        metrics=tables.metrics_dict(run_table, collected.benchmarks),
        identity=report_identity(params, cfg, collected, reference),
        mixed=mixed,
    )
    report.files += _write_tables(out, report, reference)
    report.figures, plots = _figures(cfg, report, reference)
    for name, frame in {**_plot_frames(collected), **plots}.items():
        report.files.append(_write(out / "plots" / f"{name}.csv", tables.to_csv(frame)))
    for name, fig in report.figures.items():
        for fmt in cfg.figure_formats:
            data = figures.figure_bytes(fig, fmt, cfg.dpi)
            report.files.append(_write(out / "figures" / f"{name}.{fmt}", data))
    return report


def update_readme(readme: Path, markdown: str) -> bool:
    """Paste `markdown` between the two MARKERS of `readme`; False (file untouched) without them."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < 0:
        return False
    if end < start:
        raise XtraError(f"{readme}: {MARKERS[1]} comes before {MARKERS[0]}")
    new = text[:start] + MARKERS[0] + "\n" + markdown + text[end:]
    if new != text:
        _write(readme, new)
    return True


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument(
        "--readme",
        default=None,
        metavar="FILE",
        help="also paste the results table between the results markers of FILE (a manual step, "
        "e.g. `xtra report --readme README.md`; the pipelines never pass it, so they write "
        "only under paths.results)",
    )


def run(args: argparse.Namespace) -> int:
    from xtra.config import load_params  # the lead's module; imported only when the stage runs

    params = load_params(args.params)
    out = Path(params["paths"]["results"])
    report = build_report(params, out)
    results = report.collected.results
    bad = results[results["status"] != "ok"]
    print(f"wrote {len(report.files)} files under {out}; {len(bad)} result(s) missing or partial")
    for line in tables.missing_lines(results):
        print(f"warning: {line.removeprefix('- ')}", file=sys.stderr)
    for line in tables.edge_lines(results):
        print(f"warning: {line.removeprefix('- ')}", file=sys.stderr)
    if report.mixed is not None:
        print(f"warning: {report.mixed.note()}", file=sys.stderr)
    if args.readme and Path(args.readme).is_file():
        pasted = update_readme(Path(args.readme), report.markdown)
        state = "results table updated" if pasted else "no results markers, unchanged"
        print(f"{args.readme}: {state}")
    return 0
