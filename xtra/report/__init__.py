"""The report stage: probe results -> tables (CSV, Markdown, LaTeX), figures, DVC metrics and plots.

Modules: `reference` (the published numbers shipped in `reference/`), `collect` (probe JSONs ->
tidy frame), `tables`, `figures`, `cli` (`xtra report` and `build_report`).
"""

from xtra.report.cli import Report, build_report, update_readme
from xtra.report.collect import Collected, collect_results
from xtra.report.reference import BENCHMARKS, load_reference

__all__ = ["BENCHMARKS", "Collected", "Report", "build_report", "collect_results", "load_reference", "update_readme"]
