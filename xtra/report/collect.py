"""The probe results params declares -> one tidy frame, with every expected result that is not there
(or not current) as a row whose `status` says why.

Inputs (docs/ARCHITECTURE.md): the result files of the probe stages of the current params, and only
those (`results/probe/<model>/<benchmark>-<kind>.json` of each probed model, `probe.models` or every
model, each benchmark and each kind it is probed with: the stage table's outputs), never every JSON
on disk (a removed model or benchmark, another profile's results); `results/probe/<model>/failures.json`,
written by the probe driver for the jobs that failed after their retries; and each probed model's
`metrics.json`, which carries the model's identity. One row per expected result, under the
selection protocol of params (`probe.protocol`: `paper` or `heldout`).

`status` is `ok` (a top-1 exists), `missing` (no file), `failed` (named in failures.json),
`partial` (the file exists but lacks that number) or `stale` (the file was made from another model
than the one now in `models/<model>/` (its recorded `model_identity` is not metrics.json's
`identity`), or under another protocol: its probe stage has to run again); `reason` says which file
and why. A stale result enters no table, mean or figure. A file that is not valid JSON, or whose
fields have the wrong type, raises `XtraError` naming the file.

`environments` holds the result's distinct environments (`xtra.report.environments`: thread count,
ranks, device, torch), as JSON text; `read_pretrain_environments` reads a model's pre-training ones.

`lr_edge` is `high` (`low`) when the selected learning rate is the largest (smallest) of a sweep of
two or more: the optimum may lie beyond the grid. `lr_grid` is the sweep's range, `lo..hi`.

A model whose `init` is `pixels` is the **pixel floor**: no encoder, its features the flattened
normalised pixels, probed by the linear kind only (so only its linear results are expected).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from xtra.errors import XtraError
from xtra.model.probes import PIXEL_FLOOR_INIT, model_kinds
from xtra.report.config import ReportConfig
from xtra.report.environments import distinct, environments_text
from xtra.report.reference import BENCHMARKS, KIND_ORDER, PROTOCOLS

__all__ = [
    "RESULT_COLUMNS",
    "SWEEP_COLUMNS",
    "Collected",
    "read_json",
    "read_probe_result",
    "read_failures",
    "collect_results",
    "benchmark_order",
    "read_images_seen",
    "read_model_identity",
    "read_pretrain_environments",
    "read_pretrain_log",
    "ONLINE_COLUMNS",
    "read_online_log",
    "pixel_floor_models",
    "FLOOR_INIT",
]

RESULT_COLUMNS: tuple[str, ...] = (
    "model",
    "benchmark",
    "kind",
    "protocol",
    "top1",
    "top5",
    "lr",
    "weight_decay",
    "lr_edge",
    "lr_grid",
    "status",
    "reason",
    "environments",
    "file",
)
SWEEP_COLUMNS: tuple[str, ...] = (
    "model",
    "benchmark",
    "kind",
    "protocol",
    "lr",
    "weight_decay",
    "top1",
    "top5",
    "heldout_top1",
    "selected",
)
_HEAD_NUMBERS = ("lr", "weight_decay", "top1", "top5", "heldout_top1")
_FAILURES = "failures.json"
_REASON_KEYS = ("error", "reason", "message")
FLOOR_INIT = PIXEL_FLOOR_INIT  # the pixel floor's init; the kinds it is probed with: model_kinds


@dataclass
class Collected:
    """Everything read from `results/probe/`: results (RESULT_COLUMNS), sweep heads (SWEEP_COLUMNS).

    `models` and `benchmarks` are the display orders (params first, then anything else found);
    `floor_models` are the pixel-floor models among `models`.
    """

    results: pd.DataFrame
    sweep: pd.DataFrame
    models: list[str]
    benchmarks: list[str]
    floor_models: list[str] = field(default_factory=list)


def read_json(path: Path) -> Any:
    """Parse a JSON file; an unreadable or invalid one raises `XtraError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XtraError(f"{path}: malformed JSON: {exc}") from exc


def _number(value: Any, path: Path, key: str) -> float | None:
    """A JSON number (None when absent/null/non-finite); a string or bool is malformed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise XtraError(f"{path}: malformed result: {key} is {value!r}, not a number")
    return float(value) if math.isfinite(value) else None


def _mapping(value: Any, path: Path, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise XtraError(f"{path}: malformed result: {key} is not an object")
    return value


def _selection_row(data: dict, path: Path, protocol: str) -> dict:
    selected = _mapping(data.get("selected"), path, "selected")
    top1 = _number(data.get("top1"), path, "top1")
    return {
        "protocol": protocol,
        "top1": top1,
        "top5": _number(data.get("top5"), path, "top5"),
        "lr": _number(selected.get("lr"), path, "selected.lr"),
        "weight_decay": _number(selected.get("weight_decay"), path, "selected.weight_decay"),
        "status": "ok" if top1 is not None else "partial",
        "reason": "" if top1 is not None else f"{path}: no top1",
    }


def _is_selected(head: dict, row: dict) -> bool:
    """The head the protocol selected: same lr, and same weight decay where both name one."""
    wd, chosen_wd = head["weight_decay"], row["weight_decay"]
    return head["lr"] is not None and head["lr"] == row["lr"] and (wd is None or chosen_wd is None or wd == chosen_wd)


def _heads(data: dict, path: Path, row: dict) -> list[dict]:
    heads = data.get("heads") or []
    if not isinstance(heads, list):
        raise XtraError(f"{path}: malformed result: heads is not a list")
    out = []
    for i, head in enumerate(heads):
        head = _mapping(head, path, f"heads[{i}]")
        numbers = {k: _number(head.get(k), path, f"heads[{i}].{k}") for k in _HEAD_NUMBERS}
        out.append({"protocol": row["protocol"], **numbers, "selected": _is_selected(numbers, row)})
    return out


def _grid_edge(row: dict, heads: list[dict]) -> dict:
    """Where the selected lr sits in its sweep: `lr_edge` high/low/"" and `lr_grid` `lo..hi`."""
    lrs = sorted({h["lr"] for h in heads if h["lr"] is not None})
    if not lrs:
        return {"lr_edge": "", "lr_grid": ""}
    grid = f"{lrs[0]:g}..{lrs[-1]:g}"
    edge = ""
    if len(lrs) > 1 and row["lr"] is not None:
        edge = "high" if row["lr"] == lrs[-1] else "low" if row["lr"] == lrs[0] else ""
    return {"lr_edge": edge, "lr_grid": grid}


def _job_ids(path: Path) -> dict[str, str]:
    """model, benchmark and kind from `<model>/<benchmark>-<kind>.json`."""
    benchmark, _, kind = path.stem.rpartition("-")
    if not benchmark or not kind:
        raise XtraError(f"{path}: a result file must be named <benchmark>-<kind>.json")
    return {"model": path.parent.name, "benchmark": benchmark, "kind": kind}


def read_probe_result(path: Path) -> tuple[dict, list[dict]]:
    """One result JSON -> (its selection's row, the sweep heads), without the ids."""
    ids = _job_ids(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise XtraError(f"{path}: malformed result: not a JSON object")
    for key, expected in ids.items():
        if key in data and data[key] != expected:
            raise XtraError(f"{path}: {key} is {data[key]!r} but the file name says {expected!r}")
    protocol = data.get("protocol", "paper")
    if not isinstance(protocol, str):
        raise XtraError(f"{path}: malformed result: protocol is {protocol!r}")
    row = _selection_row(data, path, protocol)
    heads = _heads(data, path, row)
    return {**row, **_grid_edge(row, heads), "environments": environments_text(data.get("environments"))}, heads


def _failure_list(data: Any, path: Path) -> list[tuple[str, str, str]]:
    """(benchmark, kind, reason) from a list of objects, {"failures": [...]}, or {"B-K": reason}."""
    if isinstance(data, dict) and isinstance(data.get("failures"), list):
        data = data["failures"]
    if isinstance(data, dict):
        data = [{"job": job, **(v if isinstance(v, dict) else {"error": v})} for job, v in data.items()]
    if not isinstance(data, list):
        raise XtraError(f"{path}: malformed failures: expected a list or an object")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise XtraError(f"{path}: malformed failures: entry {i} is not an object")
        benchmark, kind = item.get("benchmark"), item.get("kind")
        if (benchmark is None or kind is None) and isinstance(item.get("job"), str):
            benchmark, _, kind = item["job"].removesuffix(".json").rpartition("-")
        if not benchmark or not kind:
            raise XtraError(f"{path}: malformed failures: entry {i} names no benchmark and kind")
        reason = next((str(item[k]) for k in _REASON_KEYS if item.get(k) is not None), "unknown")
        out.append((str(benchmark), str(kind), reason))
    return out


def read_failures(path: Path) -> dict[tuple[str, str], str]:
    """`failures.json` -> {(benchmark, kind): reason}; an absent file gives {}."""
    if not path.is_file():
        return {}
    return {(b, k): r for b, k, r in _failure_list(read_json(path), path)}


def _ordered(preferred: list[str], found: set[str]) -> list[str]:
    return [x for x in preferred if x in found] + sorted(found - set(preferred))


def benchmark_order(cfg: ReportConfig, found: set[str] = frozenset()) -> list[str]:
    """The 15 benchmarks in table order, then the others of params, then any other found."""
    configured = list(cfg.benchmarks)
    extra = [b for b in configured if b not in BENCHMARKS]
    return list(BENCHMARKS) + extra + sorted(set(found) - set(BENCHMARKS) - set(extra))


def pixel_floor_models(cfg: ReportConfig) -> list[str]:
    """The models of params whose `init` is `pixels` (the pixel floor), in params order."""
    return [m for m, model in cfg.models.items() if model.init == FLOOR_INIT]


def _expected(cfg: ReportConfig) -> list[tuple[str, str, str, str]]:
    """(model, benchmark, kind, protocol) of every probe job params asks for: each probed model with the
    kinds it is probed with (`xtra.model.probes.model_kinds`), the probe stages' outputs."""
    return [
        (model, benchmark, kind, cfg.protocol)
        for model in cfg.probed
        for benchmark, kinds in cfg.benchmarks.items()
        for kind in model_kinds(cfg.models[model].init, kinds)
    ]


def read_model_identity(models_dir: Path, model: str) -> str | None:
    """The model's identity from `models/<model>/metrics.json` (None when it has none)."""
    path = Path(models_dir) / model / "metrics.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise XtraError(f"{path}: malformed metrics: not a JSON object")
    value = data.get("identity")
    return str(value) if value else None


def _stale(path: Path, data: dict, protocol: str, current: str | None, metrics: Path) -> str:
    """Why a result file is not the result of the current params and model ("" when it is)."""
    if data.get("protocol", "paper") != protocol:
        return f"{path}: made by the {data.get('protocol')} protocol, params say {protocol}"
    made_from = data.get("model_identity")
    if made_from and current and made_from != current:
        return f"{path}: made from model identity {str(made_from)[:12]}, but {metrics} is {current[:12]}"
    return ""


def _row(
    job: tuple[str, str, str, str], probe_dir: Path, failures: dict, current: str | None, models_dir: Path
) -> tuple[dict, list[dict]]:
    """The row of one expected result and its sweep heads (none when it is not a current result)."""
    model, benchmark, kind, protocol = job
    path = probe_dir / model / f"{benchmark}-{kind}.json"
    ids = {"model": model, "benchmark": benchmark, "kind": kind}
    if path.is_file():
        found, sweep = read_probe_result(path)
        stale = _stale(path, read_json(path), protocol, current, models_dir / model / "metrics.json")
        if not stale:
            return {**ids, **found, "file": str(path)}, [{**ids, **h} for h in sweep]
        status, reason = "stale", stale
    elif (model, benchmark, kind) in failures:
        status = "failed"
        reason = f"{probe_dir / model / _FAILURES}: {failures[(model, benchmark, kind)]}"
    else:
        status, reason = "missing", f"{path}: not found"
    row = {**ids, "protocol": protocol, "lr_edge": "", "lr_grid": "", "status": status, "reason": reason}
    return {**row, "environments": "", "file": str(path) if status == "stale" else ""}, []


def collect_results(cfg: ReportConfig) -> Collected:
    """Read the result file of every expected probe job under `paths.results`/probe (see the module doc)."""
    probe_dir = cfg.results / "probe"
    failures: dict[tuple[str, str, str], str] = {}
    for model in cfg.probed:
        failures.update({(model, b, k): r for (b, k), r in read_failures(probe_dir / model / _FAILURES).items()})
    identities = {model: read_model_identity(cfg.models_dir, model) for model in cfg.probed}
    rows, heads = [], []
    for job in _expected(cfg):
        row, sweep = _row(job, probe_dir, failures, identities[job[0]], cfg.models_dir)
        rows.append(row)
        heads += sweep
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    models = _ordered(list(cfg.probed), set(results["model"]))
    benchmarks = benchmark_order(cfg, set(results["benchmark"]))
    results = _sort(results, models, benchmarks)
    sweep = pd.DataFrame(heads, columns=list(SWEEP_COLUMNS))
    sweep[list(_HEAD_NUMBERS)] = sweep[list(_HEAD_NUMBERS)].astype(float)
    sweep["selected"] = sweep["selected"].astype(bool)
    sweep = _sort(sweep, models, benchmarks, extra=["weight_decay", "lr"])
    return Collected(
        results=results,
        sweep=sweep,
        models=models,
        benchmarks=benchmarks,
        floor_models=[m for m in pixel_floor_models(cfg) if m in models],
    )


def _sort(
    frame: pd.DataFrame, models: list[str], benchmarks: list[str], extra: list[str] | None = None
) -> pd.DataFrame:
    """Stable display order: model, benchmark, kind, protocol (params order, then by name)."""
    kinds = _ordered(list(KIND_ORDER), set(frame["kind"]))
    keys = {"model": models, "benchmark": benchmarks, "kind": kinds}
    keys["protocol"] = _ordered(list(PROTOCOLS), set(frame["protocol"]))
    rank = {col: frame[col].map({v: i for i, v in enumerate(order)}) for col, order in keys.items()}
    by = pd.DataFrame(rank).join(frame[extra or []])
    order = by.sort_values(list(by.columns), kind="mergesort").index
    return frame.loc[order].reset_index(drop=True)


def read_images_seen(models_dir: Path, model: str) -> tuple[float | None, str]:
    """`models/<model>/metrics.json` key `images_seen` -> (value, "") or (None, why it is not)."""
    path = Path(models_dir) / model / "metrics.json"
    if not path.is_file():
        return None, f"{path}: not found"
    data = read_json(path)
    if not isinstance(data, dict):
        raise XtraError(f"{path}: malformed metrics: not a JSON object")
    value = _number(data.get("images_seen"), path, "images_seen")
    return (value, "") if value is not None else (None, f"{path}: no images_seen")


def read_pretrain_environments(models_dir: Path, model: str) -> list[dict]:
    """The distinct environments of a model's pre-training (`environments` of its metrics.json; [] when none)."""
    path = Path(models_dir) / model / "metrics.json"
    data = read_json(path) if path.is_file() else {}
    return distinct(data.get("environments")) if isinstance(data, dict) else []


def _log_column(frame: pd.DataFrame, names: tuple[str, ...], prefix: str | None) -> str | None:
    for name in names:
        if name in frame.columns and frame[name].notna().any():
            return name
    if prefix is not None:
        return next((c for c in frame.columns if c.startswith(prefix)), None)
    return None


def read_pretrain_log(path: Path) -> pd.DataFrame:
    """A pre-training log (Lightning's CSVLogger layout) -> columns step, loss, lr; a row per step.

    The logger writes the loss and the learning rate on separate rows, NaN elsewhere: the loss is
    `train/loss` or `loss`, the learning rate `lr`, `train/lr` or the first `lr-*` column.
    """
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise XtraError(f"{path}: cannot read the training log: {exc}") from exc
    if frame.empty:  # a run shorter than log_every_n_steps logs a header only
        return pd.DataFrame({"step": [], "loss": [], "lr": []}, dtype=float)
    loss = _log_column(frame, ("train/loss", "loss"), None)
    if "step" not in frame.columns or loss is None:
        raise XtraError(f"{path}: training log needs a step column and a train/loss or loss column")
    lr = _log_column(frame, ("lr", "train/lr"), "lr-")
    out = pd.DataFrame({"step": frame["step"], "loss": frame[loss], "lr": frame[lr] if lr else float("nan")})
    try:
        out = out.astype(float)
    except ValueError as exc:
        raise XtraError(f"{path}: non-numeric step/loss/lr: {exc}") from exc
    out = out.dropna(subset=["step"]).dropna(subset=["loss", "lr"], how="all")
    return out.groupby("step", sort=True).first().reset_index()


ONLINE_COLUMNS = ("step", "images_seen", "kind", "lr", "top1")


def read_online_log(path: Path) -> pd.DataFrame:
    """A pre-training's online probe log (`models/<model>/online.csv`, `xtra.train.online`) -> the best
    head of each kind at each evaluation: columns step, images_seen, kind, lr, top1 (percent), one row
    per (step, kind); ties go to the smaller lr. A file that cannot be read, or lacks a column, is an
    XtraError naming it."""
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise XtraError(f"{path}: cannot read the online probe log: {exc}") from exc
    lacking = [c for c in ONLINE_COLUMNS if c not in frame.columns]
    if lacking:
        raise XtraError(f"{path}: online probe log lacks column(s) {', '.join(lacking)}")
    frame = frame[list(ONLINE_COLUMNS)]
    try:
        frame = frame.astype({"step": int, "images_seen": float, "kind": str, "lr": float, "top1": float})
    except ValueError as exc:
        raise XtraError(f"{path}: non-numeric step/images_seen/lr/top1: {exc}") from exc
    best = frame.sort_values(["step", "kind", "top1", "lr"], ascending=[True, True, False, True], kind="stable")
    return best.drop_duplicates(["step", "kind"]).reset_index(drop=True)
