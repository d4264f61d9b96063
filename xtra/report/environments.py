"""Which environments the cells of the results table come from, and the mark of a mixed table (issue 26).

A probe result records the environments of its segments (`environments`: `xtra.environment`, one
entry unless a resumed job changed thread count, ranks, device or torch), a pre-trained model's
metrics.json those of its run. The tidy results carry each result's distinct environments as JSON
(`environments` column, `environments_text`; empty for a result that records none: written before
the record existed), and `xtra.report.collect.read_pretrain_environments` reads a model's.

A table is **mixed** when its own cells (run and pixel-floor rows) were probed in more than one
environment, or its pre-trained models were trained in more than one. Its bytes then depend on more
than the results' identities: a mixed table gets a column `environment` naming, for each own row,
the values of the fields that differ (`probe threads=1,2; pretrain ranks=2`), and a note under the
Markdown table (and a warning from `xtra report`) naming the fields. Results that record no
environment take no part in the comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from xtra.report.tables import ENVIRONMENT_COLUMN, OWN_ROWS

__all__ = ["COLUMN", "Mixed", "distinct", "environments_text", "mixed_environments", "mark_table"]

COLUMN = ENVIRONMENT_COLUMN
STAGES = ("probe", "pretrain")


def distinct(segments: Any) -> list[dict]:
    """The distinct environments of a list of segments (`{"from_...": n, "environment": {...}}`), in a fixed order."""
    if not isinstance(segments, list):
        return []
    envs = {
        json.dumps(s["environment"], sort_keys=True) for s in segments if isinstance(s, dict) and "environment" in s
    }
    return [json.loads(e) for e in sorted(envs)]


def environments_text(segments: Any) -> str:
    """A result's distinct environments as JSON text ("" when it records none)."""
    envs = distinct(segments)
    return json.dumps(envs, sort_keys=True) if envs else ""


@dataclass
class Mixed:
    """The fields that differ between the environments of each stage (only stages with more than one)."""

    fields: dict[str, list[str]] = field(default_factory=dict)  # stage -> differing fields
    counts: dict[str, int] = field(default_factory=dict)  # stage -> distinct environments

    def note(self) -> str:
        parts = [
            f"{self.counts[stage]} {'pre-training' if stage == 'pretrain' else 'probe'} environments that differ "
            f"in {', '.join(f'`{f}`' for f in fields)}"
            for stage, fields in self.fields.items()
        ]
        return (
            f"Mixed environments: the cells of this table come from {' and '.join(parts)}; column "
            f"`{COLUMN}` gives each row's. Results are byte-identical only in the same environment; "
            "across environments, compare differences with the seed spread (docs/pretraining.md, Determinism)."
        )


def _differing(envs: list[dict]) -> list[str]:
    keys = sorted({k for e in envs for k in e})
    return [k for k in keys if len({json.dumps(e.get(k)) for e in envs}) > 1]


def _stage_envs(results: pd.DataFrame, pretrain: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """{stage: distinct environments} of the ok results (probe) and of their models (pretrain)."""
    ok = results[results["status"] == "ok"]
    probe = {json.dumps(e, sort_keys=True) for text in ok["environments"] if text for e in json.loads(text)}
    trained = {json.dumps(e, sort_keys=True) for m in sorted(set(ok["model"])) for e in pretrain.get(m, [])}
    return {"probe": [json.loads(e) for e in sorted(probe)], "pretrain": [json.loads(e) for e in sorted(trained)]}


def mixed_environments(results: pd.DataFrame, pretrain: dict[str, list[dict]]) -> Mixed | None:
    """The mark of a table whose ok cells come from several environments (see the module doc), else None."""
    envs = _stage_envs(results, pretrain)
    mixed = Mixed()
    for stage in STAGES:
        if len(envs[stage]) > 1:
            mixed.fields[stage], mixed.counts[stage] = _differing(envs[stage]), len(envs[stage])
    return mixed if mixed.fields else None


def _values(envs: list[dict], key: str) -> str:
    return ",".join(sorted({"?" if e.get(key) is None else str(e[key]) for e in envs}))


def mark_table(
    table: pd.DataFrame, results: pd.DataFrame, pretrain: dict[str, list[dict]], mixed: Mixed | None
) -> pd.DataFrame:
    """The table with a column `environment` when it is mixed: for each own row, the values of the
    differing fields among its cells (the other rows empty); the table unchanged otherwise."""
    if mixed is None:
        return table
    ok = results[results["status"] == "ok"]
    texts = []
    for _, row in table.iterrows():
        if row["row"] not in OWN_ROWS:
            texts.append("")
            continue
        cells = ok[(ok["model"] == row["model"]) & (ok["kind"] == row["kind"]) & (ok["protocol"] == row["protocol"])]
        envs = _stage_envs(cells, {row["model"]: pretrain.get(row["model"], [])})
        parts = [
            f"{stage} " + " ".join(f"{key}={_values(envs[stage], key)}" for key in fields)
            for stage, fields in mixed.fields.items()
            if envs[stage]
        ]
        texts.append("; ".join(parts))
    return table.assign(**{COLUMN: texts})
