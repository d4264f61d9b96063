"""The results table: this run's top-1 per model, probe kind and selection protocol, the published
numbers, and the differences, as one frame rendered to CSV, Markdown and LaTeX (booktabs).

Rows (column `row`):
- `run`: one per (model, kind, protocol) of this run;
- `floor`: the same for each pixel-floor model (`init: pixels`: the flattened normalised pixels,
  linear probe), what a pre-trained encoder has to beat;
- `published`: one per (published series, kind), its `source` column saying where each cell is from;
- `difference`: this run minus a published series of the same kind, only where both exist; and each
  run row minus the pixel floor of the same kind and protocol (`reference` `<floor> (pixel floor)`).

Columns: `row, model, kind, protocol, reference`, one per benchmark (the 15, then the others),
`mean15` (defined only when all 15 are present), `mean_present` and `n_present` (the mean over the
benchmarks present and their count), `lr_at_edge` (`benchmark:high|low;...`: the selected lr is the
largest or smallest of its sweep), `source`. A missing number is NaN (empty in CSV, `—` in
Markdown, `--` in LaTeX), never 0. For a difference row, `mean_present` compares the means over the
benchmarks this run has, and exists only if the reference has all of them. Markdown by tabulate,
LaTeX by pandas' Styler.
"""

from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from xtra.report.reference import BENCHMARKS, KIND_ORDER, MEAN15, PUBLISHED_IMAGES_SEEN

__all__ = [
    "ID_COLUMNS",
    "MEAN_COLUMNS",
    "OWN_ROWS",
    "ENVIRONMENT_COLUMN",
    "EDGE_MARK",
    "run_rows",
    "published_rows",
    "difference_rows",
    "floor_difference_rows",
    "missing_lines",
    "edge_lines",
    "results_table",
    "format_number",
    "to_csv",
    "to_markdown",
    "to_latex",
    "metrics_dict",
    "images_seen_frame",
]

ID_COLUMNS: tuple[str, ...] = ("row", "model", "kind", "protocol", "reference")
MEAN_COLUMNS: tuple[str, ...] = ("mean15", "mean_present", "n_present")
# The rows holding this run's own results (the models probed, the pixel floor among them).
OWN_ROWS: tuple[str, ...] = ("run", "floor")
# the column a table of mixed environments gets (xtra.report.environments): text, like `source`
ENVIRONMENT_COLUMN = "environment"
FLOOR_LABEL = "pixel floor"


def _means(values: pd.Series) -> dict:
    """mean15 (all 15 present, else NaN), mean over the present ones, and their count."""
    present = values.dropna()
    complete = all(pd.notna(values.get(b)) for b in BENCHMARKS)
    return {
        "mean15": float(values[list(BENCHMARKS)].mean()) if complete else math.nan,
        "mean_present": float(present.mean()) if len(present) else math.nan,
        "n_present": len(present),
    }


def _empty_row(benchmarks: list[str], **ids: str) -> dict:
    row = {c: "" for c in ID_COLUMNS}
    row.update(ids)
    row.update({b: math.nan for b in benchmarks})
    row.update({"mean15": math.nan, "mean_present": math.nan, "n_present": pd.NA, "lr_at_edge": "", "source": ""})
    return row


def _edge_text(ok: pd.DataFrame) -> str:
    """`benchmark:high;...` of the results whose selected lr is at an edge of its grid."""
    edge = ok[ok["lr_edge"].fillna("") != ""] if "lr_edge" in ok.columns else ok.iloc[:0]
    return ";".join(f"{b}:{e}" for b, e in zip(edge["benchmark"], edge["lr_edge"]))


def run_rows(
    results: pd.DataFrame, benchmarks: list[str], floor_models: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """One row per (model, kind, protocol) of the tidy results (`floor` for the pixel-floor
    models, `run` for the others); only `ok` results give numbers."""
    rows = []
    for (model, kind, protocol), group in results.groupby(["model", "kind", "protocol"], sort=False):
        row = _empty_row(
            benchmarks, row="floor" if model in floor_models else "run", model=model, kind=kind, protocol=protocol
        )
        ok = group[group["status"] == "ok"]
        row.update(dict(zip(ok["benchmark"], ok["top1"].astype(float))))
        row.update(_means(pd.Series({b: row[b] for b in benchmarks}, dtype=float)))
        row["lr_at_edge"] = _edge_text(ok)
        rows.append(row)
    frame = _frame(rows, benchmarks)
    order = frame["row"].map({r: i for i, r in enumerate(OWN_ROWS)})
    return frame.loc[order.sort_values(kind="mergesort").index].reset_index(drop=True)


def _source_text(cells: pd.DataFrame) -> str:
    """`source [confidence]`, or `benchmarks: source [confidence]; ...` when the cells differ."""
    groups: dict[str, list[str]] = {}
    for bench, source, confidence in cells[["benchmark", "source", "confidence"]].itertuples(index=False):
        groups.setdefault(source + (f" [{confidence}]" if confidence else ""), []).append(bench)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{','.join(b)}: {text}" for text, b in groups.items())


def published_rows(reference: pd.DataFrame, models: list[str], kinds: list[str], benchmarks: list[str]) -> pd.DataFrame:
    """One row per published series of `models` (reference model names) and probe kind."""
    chosen = reference[reference["model"].isin(models) & reference["kind"].isin(kinds)].copy()
    chosen["_m"] = chosen["model"].map({m: i for i, m in enumerate(models)})
    chosen["_k"] = chosen["kind"].map({k: i for i, k in enumerate(kinds)})
    chosen = chosen.sort_values(["_m", "_k"], kind="mergesort")
    rows = []
    for (series, kind), cells in chosen.groupby(["series", "kind"], sort=False):
        row = _empty_row(benchmarks, row="published", model=series, kind=kind, protocol="paper")
        values = dict(zip(cells["benchmark"], cells["top1"]))
        row.update({b: values[b] for b in benchmarks if b in values})
        row.update(_means(pd.Series({b: row[b] for b in benchmarks}, dtype=float)))
        if MEAN15 in values:
            row["mean15"] = values[MEAN15]
        row["source"] = _source_text(cells)
        rows.append(row)
    return _frame(rows, benchmarks)


def _difference(run: pd.Series, pub: pd.Series, benchmarks: list[str], reference: str | None = None) -> dict | None:
    row = _empty_row(
        benchmarks,
        row="difference",
        model=run["model"],
        kind=run["kind"],
        protocol=run["protocol"],
        reference=reference or pub["model"],
    )
    row.update({b: run[b] - pub[b] for b in benchmarks})
    row["mean15"] = run["mean15"] - pub["mean15"]
    present = [b for b in benchmarks if pd.notna(run[b])]
    if present and all(pd.notna(pub[b]) for b in present):
        row["mean_present"] = run[present].astype(float).mean() - pub[present].astype(float).mean()
        row["n_present"] = len(present)
    numbers = [row[b] for b in benchmarks] + [row["mean15"], row["mean_present"]]
    return row if any(pd.notna(v) for v in numbers) else None


def difference_rows(run: pd.DataFrame, published: pd.DataFrame, benchmarks: list[str]) -> pd.DataFrame:
    """This run minus each published series of the same probe kind, where both exist."""
    rows = []
    for _, r in run.iterrows():
        for _, p in published[published["kind"] == r["kind"]].iterrows():
            diff = _difference(r, p, benchmarks)
            if diff is not None:
                rows.append(diff)
    return _frame(rows, benchmarks)


def floor_difference_rows(run: pd.DataFrame, floor: pd.DataFrame, benchmarks: list[str]) -> pd.DataFrame:
    """Each run row minus the pixel floor of the same kind and protocol, where both exist."""
    rows = []
    for _, r in run.iterrows():
        same = floor[(floor["kind"] == r["kind"]) & (floor["protocol"] == r["protocol"])]
        for _, f in same.iterrows():
            diff = _difference(r, f, benchmarks, f"{f['model']} ({FLOOR_LABEL})")
            if diff is not None:
                rows.append(diff)
    return _frame(rows, benchmarks)


def _frame(rows: list[dict], benchmarks: list[str]) -> pd.DataFrame:
    columns = [*ID_COLUMNS, *benchmarks, *MEAN_COLUMNS, "lr_at_edge", "source"]
    frame = pd.DataFrame(rows, columns=columns)
    frame[[*benchmarks, "mean15", "mean_present"]] = frame[[*benchmarks, "mean15", "mean_present"]].astype(float)
    frame["n_present"] = frame["n_present"].astype("Int64")
    return frame


def results_table(
    results: pd.DataFrame,
    reference: pd.DataFrame,
    benchmarks: list[str],
    references: list[str],
    floor_models: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """The whole table: run rows, floor rows, published rows, then difference rows (against the
    published series, then against the pixel floor)."""
    own = run_rows(results, benchmarks, floor_models)
    run, floor = own[own["row"] == "run"], own[own["row"] == "floor"]
    kinds = [k for k in KIND_ORDER if k in set(run["kind"])] + sorted(set(run["kind"]) - set(KIND_ORDER))
    published = published_rows(reference, references, kinds, benchmarks)
    diff = difference_rows(run, published, benchmarks)
    floor_diff = floor_difference_rows(run, floor, benchmarks)
    parts = [p for p in (own, published, diff, floor_diff) if len(p)]
    if not parts:
        return _frame([], benchmarks)
    return pd.concat(parts, ignore_index=True)


def format_number(value: object, digits: int = 4) -> str:
    """A number with at most `digits` decimals and no trailing zeros; missing -> ''."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def to_csv(frame: pd.DataFrame) -> str:
    """Deterministic CSV text: numbers via `format_number`, missing cells empty."""
    text = frame.copy()
    for col in text.columns:
        if pd.api.types.is_numeric_dtype(text[col]) and not pd.api.types.is_bool_dtype(text[col]):
            text[col] = [format_number(v.item() if hasattr(v, "item") else v) for v in text[col]]
    return text.to_csv(index=False, lineterminator="\n")


def metrics_dict(run: pd.DataFrame, benchmarks: list[str]) -> dict:
    """{model: {kind: {protocol: {benchmark: top1, mean15, mean_present, n_present}}}}, no NaN."""
    out: dict = {}
    for _, r in run.iterrows():
        leaf = out.setdefault(r["model"], {}).setdefault(r["kind"], {}).setdefault(r["protocol"], {})
        for key in [*benchmarks, "mean15", "mean_present"]:
            if pd.notna(r[key]):
                leaf[key] = round(float(r[key]), 4)
        leaf["n_present"] = int(r["n_present"])
    return out


def _run_points(run: pd.DataFrame, images_seen: dict[str, float | None]) -> list[dict]:
    points = []
    for _, r in run.iterrows():
        seen = images_seen.get(r["model"])
        if seen is None or seen <= 0:
            continue
        common = {"origin": "run", "series": f"{r['model']} {r['kind']} {r['protocol']}", "images_seen": seen}
        if pd.notna(r["mean15"]):
            points.append({**common, "measure": "mean15", "top1": r["mean15"]})
        elif pd.notna(r["mean_present"]):
            points.append({**common, "measure": f"mean of {r['n_present']}", "top1": r["mean_present"]})
        if pd.notna(r.get("in1k", math.nan)):
            points.append({**common, "measure": "in1k", "top1": r["in1k"]})
    return points


def images_seen_frame(run: pd.DataFrame, images_seen: dict[str, float | None], reference: pd.DataFrame) -> pd.DataFrame:
    """Sample efficiency: images seen in pre-training vs top-1 (panel `mean` or `in1k`).

    Columns: origin (run/published), series, panel, measure, images_seen, top1. Published points
    are the attentive-probe cells of the series in `PUBLISHED_IMAGES_SEEN`; run points need a
    positive `images_seen` (a random-init control has none).
    """
    rows = []
    cells = reference[(reference["kind"] == "attentive") & reference["series"].isin(list(PUBLISHED_IMAGES_SEEN))]
    for series, seen in PUBLISHED_IMAGES_SEEN.items():
        for _, c in cells[cells["series"] == series].iterrows():
            if c["benchmark"] in (MEAN15, "in1k"):
                rows.append(
                    {
                        "origin": "published",
                        "series": series,
                        "measure": c["benchmark"],
                        "images_seen": seen,
                        "top1": c["top1"],
                    }
                )
    rows += _run_points(run, images_seen)
    frame = pd.DataFrame(rows, columns=["origin", "series", "measure", "images_seen", "top1"])
    frame.insert(2, "panel", ["in1k" if m == "in1k" else "mean" for m in frame["measure"]])
    return frame


_PROTOCOL_NOTE = (
    "Top-1 (%). Protocol `paper`: learning rate selected on the split it reports "
    "(the public protocol, and that of every published number); `heldout`: selected "
    "on a held-out part of the training set, the test split reported once. `mean15` "
    "needs all 15 benchmarks; `mean_present` is over the `n_present` present."
)
_FLOOR_NOTE = (
    "Row `floor`: the pixel floor, a linear probe on the flattened normalised pixels "
    "(no encoder, no training) under the same protocol, splits and selection; a "
    "`difference` row whose reference says `(pixel floor)` is a model minus it."
)
EDGE_MARK = {"md": "†", "tex": r"$^\dagger$"}


def _numeric_columns(table: pd.DataFrame) -> list[str]:
    """The numeric columns of a results table: benchmarks and means."""
    return [c for c in table.columns if c not in (*ID_COLUMNS, "source", "lr_at_edge", ENVIRONMENT_COLUMN)]


def _cell(row: pd.Series, col: str, missing: str, mark: str, math_signs: bool) -> str:
    """A numeric cell as text: one decimal (signed on difference rows, in `$...$` when
    `math_signs`: a typeset minus, not a hyphen), `mark` appended."""
    value = row[col]
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return missing
    if col == "n_present":
        return str(int(value))
    if row["row"] == "difference":
        return f"${value:+.1f}$" if math_signs else f"{value:+.1f}"
    return f"{value:.1f}" + mark


def _edges(table: pd.DataFrame) -> set[tuple[str, str, str, str]]:
    """(model, kind, protocol, benchmark) of every cell whose selected lr is at its grid's edge."""
    out = set()
    for _, row in table[table["row"].isin(list(OWN_ROWS))].iterrows():
        for item in filter(None, str(row.get("lr_at_edge", "") or "").split(";")):
            out.add((row["model"], row["kind"], row["protocol"], item.split(":")[0]))
    return out


def _display(table: pd.DataFrame, missing: str, mark: str, math_signs: bool = False) -> pd.DataFrame:
    """The table as text: numeric cells formatted, edge-of-grid cells marked; text cells as is."""
    edges = _edges(table)
    numeric = _numeric_columns(table)
    rows = []
    for _, row in table.iterrows():
        key = (row["model"], row["kind"], row["protocol"])
        rows.append(
            {
                c: _cell(row, c, missing, mark if (*key, c) in edges else "", math_signs)
                if c in numeric
                else str(row[c])
                for c in table.columns
            }
        )
    return pd.DataFrame(rows, columns=list(table.columns))


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _short(text: str, limit: int = 200) -> str:
    text = _md_escape(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_lines(results: pd.DataFrame) -> list[str]:
    """One line per expected result that is missing, failed or partial, with its reason."""
    return [
        f"- {r['model']} / {r['benchmark']} / {r['kind']} / {r['protocol']}: {r['status']} ({_short(str(r['reason']))})"
        for _, r in results[results["status"] != "ok"].iterrows()
    ]


def edge_lines(results: pd.DataFrame) -> list[str]:
    """One warning per result whose selected lr is the largest or smallest of its sweep."""
    ok = results[(results["status"] == "ok") & (results["lr_edge"].fillna("") != "")]
    return [
        f"- {r['model']} / {r['benchmark']} / {r['kind']} / {r['protocol']}: lr {r['lr']:g} "
        f"is the {'largest' if r['lr_edge'] == 'high' else 'smallest'} of the grid "
        f"{r['lr_grid']}; the optimum may lie beyond it (extend "
        f"`probe.benchmarks.{r['benchmark']}.lrs`)"
        for _, r in ok.iterrows()
    ]


def to_markdown(table: pd.DataFrame, results: pd.DataFrame) -> str:
    """A GitHub (pipe) Markdown table by tabulate (missing cells `—`, edge-of-grid lrs `†`), the
    notes, the edge-of-grid warnings and the missing results with their reasons."""
    text = _display(table, "—", EDGE_MARK["md"])
    text[[c for c in text.columns if c not in _numeric_columns(table)]] = text[
        [c for c in text.columns if c not in _numeric_columns(table)]
    ].map(_md_escape)
    align = ["right" if c in _numeric_columns(table) else "left" for c in table.columns]
    body = tabulate(
        text.values.tolist(), headers=list(table.columns), tablefmt="pipe", colalign=align, disable_numparse=True
    )
    lines = [_PROTOCOL_NOTE]
    if (table["row"] == "floor").any():
        lines += ["", _FLOOR_NOTE]
    lines += ["", body]
    edges = edge_lines(results)
    if edges:
        lines += [
            "",
            f"Warning: {EDGE_MARK['md']} the selected learning rate is at the edge of "
            "its grid (the sweep may be cut short):",
            "",
            *edges,
        ]
    missing = missing_lines(results)
    if missing:
        lines += ["", "Missing or partial results (shown as —, not 0):", "", *missing]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular by pandas' Styler (missing cells `--`, edge-of-grid lrs a dagger), a
    rule between the run, floor, published and difference rows."""
    numeric = _numeric_columns(table)
    text = _display(table, "--", EDGE_MARK["tex"], math_signs=True)
    spec = "".join("r" if c in numeric else "l" for c in table.columns)
    styler = (
        text.style.hide(axis="index")
        .format_index(escape="latex", axis=1)
        .format(escape="latex", subset=[c for c in table.columns if c not in numeric])
    )
    lines = styler.to_latex(hrules=True, column_format=spec).splitlines()
    body_start = lines.index("\\midrule") + 1
    out = [
        "% Generated by `xtra report`; needs \\usepackage{booktabs}. Top-1 in %; \\dagger: lr at the edge of its grid.",
        *lines[:body_start],
    ]
    for i, (kind, line) in enumerate(zip(table["row"], lines[body_start:])):
        if i and kind != table["row"].iloc[i - 1]:
            out.append("\\midrule")
        out.append(line)
    out += lines[body_start + len(table) :]
    return "\n".join(out) + "\n"
