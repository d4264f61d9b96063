"""The report's figures, built as `matplotlib.figure.Figure` objects (no pyplot, no global state;
PNG through Agg) in a seaborn theme, and rendered to bytes without time stamps.

Each function returns its Figure so tests can count panels, bars and lines:

- `bars_figure`: this run's benchmarks, a panel per probe kind, a bar per model, the pixel floor a
  dashed line;
- `paper_figure`: the published numbers (15 benchmarks, mean15) and any of this run's on them;
- `sweep_figure`: a panel per benchmark, a line per (model, kind[, weight decay]) over the lrs;
- `loss_figure`: two panels (loss, learning rate), a line per model with a pre-training log;
- `online_figure`: a panel per online probe kind, the best head's held-out top-1 against images seen,
  a line per model that trained online probes;
- `images_seen_figure`: two panels (mean top-1, ImageNet-1k top-1), a line per series;
- `reconstruction_figure`: a panel per model with an encoder, its reconstruction grid or why not.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import imread

from xtra.errors import XtraError
from xtra.report.reference import KIND_ORDER

__all__ = [
    "bars_figure",
    "paper_figure",
    "sweep_figure",
    "loss_figure",
    "online_figure",
    "images_seen_figure",
    "reconstruction_figure",
    "figure_bytes",
]

_STYLE = "whitegrid"
_CONTEXT = "paper"
_PALETTE = "colorblind"
# Without these keys a PNG or PDF carries the matplotlib version and a creation time.
_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def _figure(n_panels: int, width: float, height: float, ncols: int | None = None) -> tuple[Figure, list[Axes]]:
    """`n_panels` panels of `width` x `height` inches, `ncols` a row (default: all in one row)."""
    ncols = min(ncols or n_panels, n_panels)
    nrows = -(-n_panels // ncols)
    with sns.axes_style(_STYLE), sns.plotting_context(_CONTEXT):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def _footnote(fig: Figure, prefix: str, reasons: dict[str, str] | None) -> None:
    if reasons:
        text = prefix + "; ".join(f"{name} ({why})" for name, why in reasons.items())
        fig.supxlabel(text, fontsize=6, color="0.3", wrap=True)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True, color="0.3")


def figure_bytes(fig: Figure, fmt: str, dpi: int = 150) -> bytes:
    """The figure as PNG or PDF bytes, identical from run to run (no software or date stamp)."""
    engine = fig.get_layout_engine()
    if engine is not None and engine.adjust_compatible is False:
        # lay the panels out once, then keep them: each format would otherwise redo it
        engine.execute(fig)
        fig.set_layout_engine("none")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_METADATA.get(fmt, {}))
    return buffer.getvalue()


def _bar_label(row: pd.Series) -> str:
    if row["row"] == "published":
        return f"{row['model']} (published)"
    if row["row"] == "floor":
        return f"{row['model']} {row['kind']} (pixel floor)"
    return f"{row['model']} {row['protocol']}"


def _floor_lines(ax: Axes, floor: pd.DataFrame, benchmarks: list[str], x: np.ndarray) -> None:
    """The pixel floor: a dashed black segment across each benchmark group, its value beside it."""
    for style, (_, row) in zip(("--", ":", "-."), floor.iterrows()):
        heights = row[benchmarks].to_numpy(dtype=float)
        ax.hlines(heights, x - 0.45, x + 0.45, colors="black", linestyles=style, linewidth=1.2, label=_bar_label(row))
        for xi, h in zip(x, heights):
            if np.isfinite(h):
                ax.text(xi + 0.46, h, f"{h:.1f}", fontsize=5, va="center", ha="left")


def bars_figure(table: pd.DataFrame, benchmarks: list[str], missing: dict[str, str] | None = None) -> Figure:
    """Top-1 on this run's benchmarks: a panel per probe kind, a bar per run row of that kind, the
    pixel floor (`floor` rows) a dashed line across each group, in every panel (it is linear).

    `table` holds run and floor rows (results_table columns); `benchmarks` are the groups on the
    x axis. A missing value is a gap, never a zero bar; `missing` ("model/benchmark/kind" ->
    status and reason) is listed under the figure.
    """
    run, floor = table[table["row"] == "run"], table[table["row"] == "floor"]
    kinds = list(dict.fromkeys(run["kind"])) or list(dict.fromkeys(floor["kind"])) or ["linear"]
    fig, axes = _figure(len(kinds), max(5.0, 1.4 * len(benchmarks) + 3), 3.6, ncols=1)
    x = np.arange(len(benchmarks))
    for ax, kind in zip(axes, kinds):
        rows = run[run["kind"] == kind]
        colors = sns.color_palette(_PALETTE, max(len(rows), 1))
        width = 0.8 / max(len(rows), 1)
        for i, (_, row) in enumerate(rows.iterrows()):
            offset = (i - (len(rows) - 1) / 2) * width
            heights = row[benchmarks].to_numpy(dtype=float)
            bars = ax.bar(x + offset, heights, width, label=_bar_label(row), color=colors[i])
            ax.bar_label(
                bars, [f"{h:.1f}" if np.isfinite(h) else "" for h in heights], fontsize=6, padding=1
            )  # a missing value: a gap, no label
        _floor_lines(ax, floor, benchmarks, x)
        ax.set_xticks(x, benchmarks)
        ax.set(title=f"{kind} probe", ylabel="top-1 (%)", ylim=(0, 105))
        if len(rows) or len(floor):
            ax.legend(
                fontsize=6,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.12),
                ncols=min(3, len(rows) + len(floor)),
                frameon=False,
            )
        else:
            _note(ax, "no results")
    _footnote(fig, "not shown: ", missing)
    return fig


def paper_figure(table: pd.DataFrame, benchmarks: list[str], run_benchmarks: list[str]) -> Figure:
    """The paper comparison: a panel per probe kind, a bar series per published row and per run
    row with a number on `benchmarks` (the 15 and mean15), the groups any row has a number in.

    When this run has none of them, the figure says so and names the benchmarks it has instead.
    """
    kinds = list(dict.fromkeys(table["kind"])) or ["attentive"]
    widest = max([int(table.loc[table["kind"] == k, benchmarks].notna().any().sum()) for k in kinds] + [1])
    fig, axes = _figure(len(kinds), max(5.0, 0.55 * widest + 3), 3.6, ncols=1)
    for ax, kind in zip(axes, kinds):
        of_kind = table[table["kind"] == kind]
        groups = [b for b in benchmarks if of_kind[b].notna().any()]  # this panel's benchmarks
        x = np.arange(len(groups))
        rows = of_kind[of_kind[groups].notna().any(axis=1)] if groups else of_kind.iloc[:0]
        colors = sns.color_palette(_PALETTE, max(len(rows), 1))
        width = 0.8 / max(len(rows), 1)
        for i, (_, row) in enumerate(rows.iterrows()):
            offset = (i - (len(rows) - 1) / 2) * width
            ax.bar(
                x + offset,
                row[groups].to_numpy(dtype=float),
                width,
                label=_bar_label(row),
                color=colors[i],
                hatch="//" if row["row"] == "published" else None,
            )
        ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
        ax.set(
            title=f"{kind} probe: published numbers",
            ylabel="top-1 (%)",
            ylim=(0, 100),
            xlim=(-0.6, max(len(groups), 4) - 0.4),
        )  # a lone group keeps a bar's width
        if len(rows):
            ax.legend(
                fontsize=6,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.2 if len(groups) > 6 else -0.12),
                ncols=min(3, len(rows)),
                frameon=False,
            )
        else:
            _note(ax, f"no published {kind}-probe number for the models shown")
    if not table.loc[table["row"] == "run", benchmarks].notna().any().any():
        fig.supxlabel(
            "this run probes none of these benchmarks (it probes "
            f"{', '.join(run_benchmarks) or 'nothing'}: see top1_bars)",
            fontsize=7,
            color="0.3",
        )
    return fig


def _sweep_lines(group: pd.DataFrame, floor_models: set[str]) -> list[tuple[str, pd.DataFrame]]:
    """A line per (model, kind), split by weight decay when the sweep has several."""
    several_wd = group["weight_decay"].nunique(dropna=True) > 1
    keys = ["model", "kind", "weight_decay"] if several_wd else ["model", "kind"]
    lines = []
    for key, part in group.groupby(keys, sort=False, dropna=False):
        label = f"{key[0]} {key[1]}" + (f" wd={key[2]:g}" if several_wd else "")
        label += " (pixel floor)" if key[0] in floor_models else ""
        lines.append((label, part.sort_values("lr")))
    return lines


def sweep_figure(
    sweep: pd.DataFrame, floor_models: list[str] | tuple[str, ...] = (), edges: list[str] | None = None
) -> Figure:
    """Learning-rate sweep: a panel per benchmark, top-1 (on the reported split) against lr, a
    ring on the lr the selection protocol chose; the pixel floor dashed black. `edges` (selections
    at an edge of their grid) are listed under the figure."""
    benchmarks = list(dict.fromkeys(sweep["benchmark"]))
    fig, axes = _figure(max(len(benchmarks), 1), 3.2, 3.0, ncols=5)
    if not benchmarks:
        _note(axes[0], "no learning-rate sweep in the probe results")
        return fig
    for ax, benchmark in zip(axes, benchmarks):
        lines = _sweep_lines(sweep[sweep["benchmark"] == benchmark], set(floor_models))
        colors = sns.color_palette(_PALETTE, len(lines))
        for color, (label, part) in zip(colors, lines):
            floor = label.endswith("(pixel floor)")
            color = "black" if floor else color
            ax.plot(
                part["lr"],
                part["top1"],
                marker="o",
                markersize=3,
                label=label,
                color=color,
                linestyle="--" if floor else "-",
            )
            chosen = part[part["selected"]]
            ax.scatter(chosen["lr"], chosen["top1"], s=60, facecolors="none", edgecolors=color)
        ax.set_xscale("log")
        lrs = sorted(sweep.loc[sweep["benchmark"] == benchmark, "lr"].dropna().unique())
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45, fontsize=6)
        ax.minorticks_off()
        ax.set(title=benchmark, xlabel="learning rate", ylabel="top-1 (%)")
        ax.legend(fontsize=5, loc="best", framealpha=0.6)
    protocols = ", ".join(dict.fromkeys(sweep["protocol"]))
    text = f"ring: the lr selected by the {protocols} protocol"
    if edges:
        text += (
            f". At the edge of its grid (the optimum may lie beyond): {len(edges)} of "
            f"{int(sweep['selected'].sum())} selections: " + "; ".join(edges)
        )
    fig.supxlabel(text, fontsize=6, color="0.3", wrap=True)
    return fig


def loss_figure(logs: dict[str, pd.DataFrame], missing: dict[str, str]) -> Figure:
    """Pre-training curves: loss and learning rate against step, a line per model with a log."""
    fig, (loss_ax, lr_ax) = _figure(2, 4.0, 3.0)
    colors = sns.color_palette(_PALETTE, max(len(logs), 1))
    for color, (model, log) in zip(colors, logs.items()):
        part = log.dropna(subset=["loss"])
        loss_ax.plot(part["step"], part["loss"], label=model, color=color)
        part = log.dropna(subset=["lr"])
        if len(part):
            lr_ax.plot(part["step"], part["lr"], label=model, color=color)
    loss_ax.set(title="pre-training loss", xlabel="step", ylabel="loss")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    for ax in (loss_ax, lr_ax):
        if ax.get_lines():
            ax.legend(fontsize=6)
    _footnote(fig, "no log: ", missing)
    if not logs:
        _note(loss_ax, "no pre-training log")
    return fig


def online_figure(online: dict[str, pd.DataFrame], missing: dict[str, str]) -> Figure:
    """Online probes along pre-training (`collect.read_online_log`): a panel per probe kind, the best
    head's top-1 on the pre-training set's held-out split against images seen, a line per model. Its
    own axes: these are no benchmark's numbers, and no published point goes beside them."""
    found = {k for frame in online.values() for k in frame["kind"]}
    kinds = [k for k in KIND_ORDER if k in found] + sorted(found - set(KIND_ORDER))
    fig, axes = _figure(max(len(kinds), 1), 4.0, 3.0)
    colors = dict(zip(online, sns.color_palette(_PALETTE, max(len(online), 1))))
    for ax, kind in zip(axes, kinds):
        for model, frame in online.items():
            part = frame[frame["kind"] == kind]
            if len(part):
                ax.plot(part["images_seen"], part["top1"], marker="o", markersize=3, label=model, color=colors[model])
        ax.set(
            title=f"online {kind} probe (best lr)", xlabel="images seen in pre-training", ylabel="held-out top-1 (%)"
        )
        ax.legend(fontsize=6)
    _footnote(fig, "no online probes: ", missing)
    if not kinds:
        _note(axes[0], "no model trained online probes (models.<m>.online_probe.kinds)")
    return fig


def _floor_levels(ax: Axes, floor: pd.DataFrame | None, panel: str) -> None:
    """The pixel floor's value for a panel (`mean`: mean15, else the mean over the benchmarks
    present; `in1k`) as a dashed horizontal line."""
    for style, (_, row) in zip(("--", ":", "-."), (floor if floor is not None else pd.DataFrame()).iterrows()):
        if panel == "in1k":
            value, which = row.get("in1k", np.nan), "in1k"
        elif pd.notna(row["mean15"]):
            value, which = row["mean15"], "mean15"
        else:
            value, which = row["mean_present"], f"mean of {row['n_present']}"
        if pd.notna(value):
            ax.axhline(
                value,
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"{row['model']} {row['kind']} (pixel floor, {which})",
            )


def images_seen_figure(
    points: pd.DataFrame, missing: dict[str, str] | None = None, floor: pd.DataFrame | None = None
) -> Figure:
    """Sample efficiency: top-1 against images seen in pre-training (log scale), a line per series.

    `points` is `tables.images_seen_frame`; panel `mean` holds the 15-benchmark means (or, for this
    run, the mean over the benchmarks present, so labelled), panel `in1k` ImageNet-1k. The pixel
    floor (`floor` rows of the results table: no pre-training) is a dashed horizontal line.
    """
    fig, axes = _figure(2, 4.2, 3.4)
    titles = {"mean": "mean top-1 (15 benchmarks)", "in1k": "ImageNet-1k top-1"}
    series = list(dict.fromkeys(points["series"]))
    colors = dict(zip(series, sns.color_palette(_PALETTE, max(len(series), 1))))
    for ax, panel in zip(axes, titles):
        part = points[points["panel"] == panel]
        for name, group in part.groupby("series", sort=False):
            marker = "s" if group["origin"].iloc[0] == "published" else "o"
            ax.plot(
                group["images_seen"], group["top1"], marker=marker, linestyle="none", color=colors[name], label=name
            )
            for _, p in group.iterrows():
                if p["measure"] not in ("mean15", "in1k"):
                    ax.annotate(
                        p["measure"],
                        (p["images_seen"], p["top1"]),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        _floor_levels(ax, floor, panel)
        ax.set_xscale("log")
        ax.set(title=titles[panel], xlabel="images seen in pre-training", ylabel="top-1 (%)")
        if len(part) or ax.get_lines():
            ax.legend(fontsize=6)
        else:
            _note(ax, "no points")
    _footnote(fig, "not shown: ", missing)
    return fig


def _read_image(path: Path) -> np.ndarray:
    try:
        return imread(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise XtraError(f"{path}: cannot read the image: {exc}") from exc


def reconstruction_figure(images: dict[str, Path], titles: dict[str, str] | None = None) -> Figure:
    """A panel per model: its `reconstruction.png` (columns: input, target, prediction), or why it
    is not there. `titles` (default: the model names) head the panels."""
    names = list(images) or ["(no model)"]
    fig, axes = _figure(len(names), 3.0, 4.0)
    for ax, name in zip(axes, names):
        path = images.get(name)
        ax.set_axis_off()
        ax.set_title((titles or {}).get(name, name), fontsize=8)
        if path is not None and Path(path).is_file():
            ax.imshow(_read_image(Path(path)))
        else:
            _note(ax, f"not written:\n{path}" if path else "no model")
    fig.supxlabel(
        "columns: input | target (first block grey: never predicted) | predicted next blocks", fontsize=7, color="0.3"
    )
    return fig
