"""Published numbers the report puts beside this run's: the paper CSVs shipped in `reference/`.

Two files, typed in from the papers and official releases (see `reference/README.md`):

- `aim_table6_15_benchmarks.csv`: attentive-probe top-1 of AIM and other models on the 15
  benchmarks (AIM paper Table 6), one row per model, one column per benchmark plus `avg`;
- `xtra_reported.csv`: what XTRA reports, one row per (model, benchmark, protocol) with its
  `source` and `confidence`.

`load_reference` turns both into one tidy frame with a row per published cell. An empty cell is
"not found" and gives no row: it is never filled in.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xtra.errors import XtraError

__all__ = [
    "BENCHMARKS",
    "DEMO_BENCHMARKS",
    "MEAN15",
    "KIND_ORDER",
    "PROTOCOLS",
    "DEFAULT_REFERENCES",
    "PUBLISHED_IMAGES_SEEN",
    "PACKAGE_REFERENCE_DIR",
    "REFERENCE_COLUMNS",
    "resolve_reference_dir",
    "load_reference",
    "series_label",
]

# The 15 probing benchmarks in the order of the paper's tables (= the reference CSV columns).
BENCHMARKS: tuple[str, ...] = (
    "in1k",
    "inat18",
    "cifar10",
    "cifar100",
    "food101",
    "dtd",
    "pets",
    "cars",
    "iwildcam",
    "camelyon17",
    "pcam",
    "rxrx1",
    "eurosat",
    "fmow",
    "infograph",
)
# The embedded demo's benchmarks: no published numbers exist for them.
DEMO_BENCHMARKS: tuple[str, ...] = ("mnist", "digits")
# The pseudo-benchmark holding a published 15-benchmark mean (`avg` / `mean15` in the CSVs).
MEAN15 = "mean15"
KIND_ORDER: tuple[str, ...] = ("attentive", "linear")
# Selection protocols: `paper` selects the learning rate on the split it reports (the public
# protocol, and that of every published number); `heldout` selects on a held-out train part.
PROTOCOLS: tuple[str, ...] = ("paper", "heldout")
# Published models shown beside this run unless params `report.reference_models` says otherwise.
DEFAULT_REFERENCES: tuple[str, ...] = ("XTRA-B/16", "XTRA-H/14", "AIM-0.6B")
# Pre-training images seen, for the sample-efficiency view (METHOD.md, reference/README.md).
PUBLISHED_IMAGES_SEEN: dict[str, float] = {
    "XTRA-B/16 (IN-1k)": 1.281e6 * 800,
    "XTRA-H/14 (IN-21k)": 13.1e6 * 100,
    "AIM-0.6B (DFN-2B+)": 2.0e9,
}

PACKAGE_REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
_DEFAULT_SETTING = "xtra/report/reference"
_AIM_FILE = "aim_table6_15_benchmarks.csv"
_XTRA_FILE = "xtra_reported.csv"
_AIM_SOURCE = "AIM paper Table 6"
REFERENCE_COLUMNS: tuple[str, ...] = (
    "model",
    "pretrain_data",
    "series",
    "benchmark",
    "kind",
    "top1",
    "source",
    "confidence",
    "note",
    "file",
)


def series_label(model: str, pretrain_data: str) -> str:
    """One published series: a model and what it was pre-trained on, e.g. `AIM-0.6B (DFN-2B+)`."""
    return f"{model} ({pretrain_data})" if pretrain_data else model


def resolve_reference_dir(setting: str | Path | None) -> Path:
    """The folder of the reference CSVs: params `report.reference_dir`, or the package's copy.

    The default setting (`xtra/report/reference`) falls back to the installed package's data when
    it is not found relative to the working directory; any other folder must exist.
    """
    if setting is None:
        return PACKAGE_REFERENCE_DIR
    path = Path(setting)
    if path.is_dir():
        return path
    if str(setting).rstrip("/") == _DEFAULT_SETTING:
        return PACKAGE_REFERENCE_DIR
    raise XtraError(f"report.reference_dir: folder {path} does not exist")


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise XtraError(f"{path}: reference file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise XtraError(f"{path}: cannot read reference CSV: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise XtraError(f"{path}: reference CSV lacks column(s) {', '.join(missing)}")
    return frame


def _number(text: str, path: Path, where: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise XtraError(f"{path}: {where}: {text!r} is not a number") from exc


def _aim_rows(path: Path) -> list[dict]:
    frame = _read_csv(path, ("model", "pretrain_data", *BENCHMARKS, "avg"))
    rows = []
    for i, rec in frame.iterrows():
        for column in (*BENCHMARKS, "avg"):
            value = _number(rec[column], path, f"row {i + 2} column {column}")
            if value is None:
                continue
            rows.append(
                {
                    "model": rec["model"],
                    "pretrain_data": rec["pretrain_data"],
                    "benchmark": MEAN15 if column == "avg" else column,
                    "kind": "attentive",
                    "top1": value,
                    "source": _AIM_SOURCE,
                    "confidence": "",
                    "note": rec.get("note", ""),
                    "file": path.name,
                }
            )
    return rows


def _xtra_rows(path: Path) -> list[dict]:
    frame = _read_csv(path, ("model", "pretrain_data", "benchmark", "protocol", "top1", "source", "confidence"))
    rows = []
    for i, rec in frame.iterrows():
        value = _number(rec["top1"], path, f"row {i + 2} column top1")
        if value is None:
            continue
        rows.append(
            {
                "model": rec["model"],
                "pretrain_data": rec["pretrain_data"],
                "benchmark": rec["benchmark"],
                "kind": rec["protocol"],
                "top1": value,
                "source": rec["source"],
                "confidence": rec["confidence"],
                "note": "",
                "file": path.name,
            }
        )
    return rows


def load_reference(reference_dir: str | Path | None = None) -> pd.DataFrame:
    """All published cells, one row each, with their source and confidence.

    Columns: `REFERENCE_COLUMNS`. `kind` is the probe kind (`attentive`/`linear`); `benchmark` is
    one of `BENCHMARKS` or `MEAN15`. A cell given by both files (AIM-0.6B's mean) is kept once,
    from the per-model CSV (`xtra_reported.csv`), whose source column names it; two different
    values for the same cell are an error naming both files.
    """
    folder = resolve_reference_dir(reference_dir)
    rows = _aim_rows(folder / _AIM_FILE) + _xtra_rows(folder / _XTRA_FILE)
    frame = pd.DataFrame(rows, columns=[c for c in REFERENCE_COLUMNS if c != "series"])
    frame.insert(2, "series", [series_label(m, d) for m, d in zip(frame["model"], frame["pretrain_data"])])
    key = ["series", "benchmark", "kind"]
    for _, group in frame.groupby(key, sort=False):
        if group["top1"].nunique() > 1:
            cell = "/".join(str(v) for v in group.iloc[0][key])
            raise XtraError(
                f"{folder / _XTRA_FILE} and {folder / _AIM_FILE} disagree on {cell}: {sorted(group['top1'].tolist())}"
            )
    return frame.drop_duplicates(subset=key, keep="first").reset_index(drop=True)
