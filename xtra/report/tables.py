"""The results table: this run's top-1 per model, probe kind and selection protocol, the published
numbers, and the differences, as one frame rendered to CSV, Markdown and LaTeX (booktabs).

Rows (column `row`):
- `run`: one per (model, kind, protocol) of this run;
- `published`: one per (published series, kind), its `source` column saying where each cell is from;
- `difference`: this run minus a published series of the same kind, only where both exist.

Columns: `row, model, kind, protocol, reference`, one per benchmark (the 15, then the others),
`mean15` (defined only when all 15 are present), `mean_present` and `n_present` (the mean over the
benchmarks present and their count), `source`. A missing number is NaN (empty in CSV, `—` in
Markdown, `--` in LaTeX), never 0. For a difference row, `mean_present` compares the means over the
benchmarks this run has, and exists only if the published series has all of them.
"""

from __future__ import annotations

import math

import pandas as pd

from xtra.report.reference import BENCHMARKS, KIND_ORDER, MEAN15, PUBLISHED_IMAGES_SEEN

__all__ = [
    "ID_COLUMNS",
    "MEAN_COLUMNS",
    "run_rows",
    "published_rows",
    "difference_rows",
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
    row.update({"mean15": math.nan, "mean_present": math.nan, "n_present": pd.NA, "source": ""})
    return row


def run_rows(results: pd.DataFrame, benchmarks: list[str]) -> pd.DataFrame:
    """One row per (model, kind, protocol) of the tidy results; only `ok` results give numbers."""
    rows = []
    for (model, kind, protocol), group in results.groupby(["model", "kind", "protocol"],
                                                          sort=False):
        row = _empty_row(benchmarks, row="run", model=model, kind=kind, protocol=protocol)
        ok = group[group["status"] == "ok"]
        row.update(dict(zip(ok["benchmark"], ok["top1"].astype(float))))
        row.update(_means(pd.Series({b: row[b] for b in benchmarks}, dtype=float)))
        rows.append(row)
    return _frame(rows, benchmarks)


def _source_text(cells: pd.DataFrame) -> str:
    """`source [confidence]`, or `benchmarks: source [confidence]; ...` when the cells differ."""
    groups: dict[str, list[str]] = {}
    for bench, source, confidence in cells[["benchmark", "source", "confidence"]].itertuples(
            index=False):
        groups.setdefault(source + (f" [{confidence}]" if confidence else ""), []).append(bench)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{','.join(b)}: {text}" for text, b in groups.items())


def published_rows(reference: pd.DataFrame, models: list[str], kinds: list[str],
                   benchmarks: list[str]) -> pd.DataFrame:
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


def _difference(run: pd.Series, pub: pd.Series, benchmarks: list[str]) -> dict | None:
    row = _empty_row(benchmarks, row="difference", model=run["model"], kind=run["kind"],
                     protocol=run["protocol"], reference=pub["model"])
    row.update({b: run[b] - pub[b] for b in benchmarks})
    row["mean15"] = run["mean15"] - pub["mean15"]
    present = [b for b in benchmarks if pd.notna(run[b])]
    if present and all(pd.notna(pub[b]) for b in present):
        row["mean_present"] = run[present].astype(float).mean() - pub[present].astype(float).mean()
        row["n_present"] = len(present)
    numbers = [row[b] for b in benchmarks] + [row["mean15"], row["mean_present"]]
    return row if any(pd.notna(v) for v in numbers) else None


def difference_rows(run: pd.DataFrame, published: pd.DataFrame,
                    benchmarks: list[str]) -> pd.DataFrame:
    """This run minus each published series of the same probe kind, where both exist."""
    rows = []
    for _, r in run.iterrows():
        for _, p in published[published["kind"] == r["kind"]].iterrows():
            diff = _difference(r, p, benchmarks)
            if diff is not None:
                rows.append(diff)
    return _frame(rows, benchmarks)


def _frame(rows: list[dict], benchmarks: list[str]) -> pd.DataFrame:
    columns = [*ID_COLUMNS, *benchmarks, *MEAN_COLUMNS, "source"]
    frame = pd.DataFrame(rows, columns=columns)
    frame[[*benchmarks, "mean15", "mean_present"]] = frame[
        [*benchmarks, "mean15", "mean_present"]].astype(float)
    frame["n_present"] = frame["n_present"].astype("Int64")
    return frame


def results_table(results: pd.DataFrame, reference: pd.DataFrame, benchmarks: list[str],
                  references: list[str]) -> pd.DataFrame:
    """The whole table: run rows, then published rows, then difference rows."""
    run = run_rows(results, benchmarks)
    kinds = [k for k in KIND_ORDER if k in set(run["kind"])] + sorted(
        set(run["kind"]) - set(KIND_ORDER))
    published = published_rows(reference, references, kinds, benchmarks)
    diff = difference_rows(run, published, benchmarks)
    parts = [p for p in (run, published, diff) if len(p)]
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
        leaf = out.setdefault(r["model"], {}).setdefault(r["kind"], {}).setdefault(
            r["protocol"], {})
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
        common = {"origin": "run", "series": f"{r['model']} {r['kind']} {r['protocol']}",
                  "images_seen": seen}
        if pd.notna(r["mean15"]):
            points.append({**common, "measure": "mean15", "top1": r["mean15"]})
        elif pd.notna(r["mean_present"]):
            points.append({**common, "measure": f"mean of {r['n_present']}",
                           "top1": r["mean_present"]})
        if pd.notna(r.get("in1k", math.nan)):
            points.append({**common, "measure": "in1k", "top1": r["in1k"]})
    return points


def images_seen_frame(run: pd.DataFrame, images_seen: dict[str, float | None],
                      reference: pd.DataFrame) -> pd.DataFrame:
    """Sample efficiency: images seen in pre-training vs top-1 (panel `mean` or `in1k`).

    Columns: origin (run/published), series, panel, measure, images_seen, top1. Published points
    are the attentive-probe cells of the series in `PUBLISHED_IMAGES_SEEN`; run points need a
    positive `images_seen` (a random-init control has none).
    """
    rows = []
    cells = reference[(reference["kind"] == "attentive") &
                      reference["series"].isin(list(PUBLISHED_IMAGES_SEEN))]
    for series, seen in PUBLISHED_IMAGES_SEEN.items():
        for _, c in cells[cells["series"] == series].iterrows():
            if c["benchmark"] in (MEAN15, "in1k"):
                rows.append({"origin": "published", "series": series, "measure": c["benchmark"],
                             "images_seen": seen, "top1": c["top1"]})
    rows += _run_points(run, images_seen)
    frame = pd.DataFrame(rows, columns=["origin", "series", "measure", "images_seen", "top1"])
    frame.insert(2, "panel", ["in1k" if m == "in1k" else "mean" for m in frame["measure"]])
    return frame


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}
_PROTOCOL_NOTE = ("Top-1 (%). Protocol `paper`: learning rate selected on the split it reports "
                  "(the public protocol, and that of every published number); `heldout`: selected "
                  "on a held-out part of the training set, the test split reported once. `mean15` "
                  "needs all 15 benchmarks; `mean_present` is over the `n_present` present.")


def _cell(row: pd.Series, col: str, numeric: set[str], missing: str) -> str | None:
    """A numeric cell as text (one decimal; signed on difference rows), or None for text cells."""
    if col not in numeric:
        return None
    value = row[col]
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return missing
    if col == "n_present":
        return str(int(value))
    return f"{value:+.1f}" if row["row"] == "difference" else f"{value:.1f}"


def _text_rows(table: pd.DataFrame, missing: str, escape) -> list[list[str]]:
    numeric = set(table.columns[len(ID_COLUMNS):-1])
    out = []
    for _, row in table.iterrows():
        cells = []
        for col in table.columns:
            text = _cell(row, col, numeric, missing)
            cells.append(escape(str(row[col])) if text is None else text)
        out.append(cells)
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _missing_lines(results: pd.DataFrame) -> list[str]:
    lines = []
    for _, r in results[results["status"] != "ok"].iterrows():
        reason = _md_escape(str(r["reason"]))
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        lines.append(f"- {r['model']} / {r['benchmark']} / {r['kind']} / {r['protocol']}: "
                     f"{r['status']} ({reason})")
    return lines


def to_markdown(table: pd.DataFrame, results: pd.DataFrame) -> str:
    """A GitHub Markdown table (missing cells `—`), the protocol note and the missing results."""
    numeric = set(table.columns[len(ID_COLUMNS):-1])
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---:" if c in numeric else "---" for c in table.columns) + "|"
    body = ["| " + " | ".join(cells) + " |" for cells in _text_rows(table, "—", _md_escape)]
    lines = [_PROTOCOL_NOTE, "", header, rule, *body]
    missing = _missing_lines(results)
    if missing:
        lines += ["", "Missing or partial results (shown as —, not 0):", "", *missing]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular; missing cells `--`, a rule between run, published and difference rows."""
    numeric = set(table.columns[len(ID_COLUMNS):-1])
    spec = "".join("r" if c in numeric else "l" for c in table.columns)
    lines = ["% Generated by `xtra report`; needs \\usepackage{booktabs}. Top-1 in %.",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(_tex_escape(c) for c in table.columns) + " \\\\", "\\midrule"]
    previous = None
    signed = [i for i, c in enumerate(table.columns) if c in numeric]
    for kind, cells in zip(table["row"], _text_rows(table, "--", _tex_escape)):
        for i in signed:  # a typeset minus (and plus) sign, not a hyphen
            cells[i] = f"${cells[i]}$" if cells[i][:1] in "+-" and cells[i] != "--" else cells[i]
        if previous is not None and kind != previous:
            lines.append("\\midrule")
        previous = kind
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
