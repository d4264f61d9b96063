"""The typed config of the report stage: what `xtra report` reads from params, built once.

`ReportConfig.from_params(params)` takes the validated params (a partial dict, as tests write them,
gets the schema's defaults for what it leaves out: the schema is the one home of defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xtra.config import section_defaults

__all__ = ["ReportModel", "ReportConfig"]


@dataclass(frozen=True)
class ReportModel:
    """What the report shows of a model: how it was made, and its mask for the figure titles."""

    init: str  # pretrain | random | official | pixels
    block_size: int | None
    block_order: str


@dataclass(frozen=True)
class ReportConfig:
    """The report stage: its inputs' folders, the models and benchmarks of params (in params order), the
    protocol, and the `report` section (published rows, reference data, figure formats)."""

    results: Path  # paths.results: probe results in, tables and figures out
    models_dir: Path  # paths.models: each model's log.csv, metrics.json, reconstruction.png
    models: dict[str, ReportModel]
    probed: tuple[str, ...]  # the models whose probe results it reads: probe.models, else every model
    benchmarks: dict[str, tuple[str, ...]]  # benchmark -> its kinds
    protocol: str
    reference_models: tuple[str, ...]
    reference_dir: str | None
    dpi: int
    figure_formats: tuple[str, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ReportConfig:
        report = {**section_defaults("report"), **(params.get("report") or {})}
        model_defaults, bench_defaults = section_defaults("model"), section_defaults("benchmark")
        arch_defaults, probe_defaults = section_defaults("arch"), section_defaults("probe")
        models = {}
        for name, section in params["models"].items():
            section = {**model_defaults, **(section or {})}
            arch = {**arch_defaults, **(section.get("arch") or {})}
            models[name] = ReportModel(section["init"], arch["block_size"], arch["block_order"])
        probe = {**probe_defaults, **params["probe"]}
        return cls(
            results=Path(params["paths"]["results"]),
            models_dir=Path(params["paths"]["models"]),
            models=models,
            probed=tuple(probe.get("models") or models),
            benchmarks={b: tuple({**bench_defaults, **s}["kinds"]) for b, s in probe["benchmarks"].items()},
            protocol=probe["protocol"],
            reference_models=tuple(report["reference_models"]),
            reference_dir=report["reference_dir"],
            dpi=int(report["dpi"]),
            figure_formats=tuple(report["figure_formats"]),
        )
