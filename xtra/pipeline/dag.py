"""The pipeline's stages, computed once from params for both DAG front-ends.

`stage_table(params)` lists every stage of the run: one `prepare` per dataset, one `pretrain` per
model, one `probe` per (probed model, benchmark) and one `report`, each with exactly what its
result depends on (`xtra.identity`, the one table both front-ends and the commands use):

- params: the keys that can change the stage's result (`xtra.identity.stage_keys`; `resources`,
  worker counts, logging, checkpoint and validation cadence, `probe.ray` and `probe.models` are none
  of them), plus the stage kind's recipe version (`xtra/recipes.yaml`);
- data: the files other stages (or the user) write, each standing for its producer's identity: the
  prepared dataset's `manifest.json` (it records every shard's sha256), the model's `metrics.json`
  (it carries the model's identity: a re-run that rewrites model.pt with the same identity changes
  no byte of it), the source checkpoint of an `init: official` or `backbone` model, the result JSONs
  and metrics of the report, and the report's reference CSVs;
- no code: a refactor re-runs nothing; a change of numerics bumps the recipe version.

`dvc.yaml` is this table written out by `xtra dag` (`xtra.pipeline.dvc_yaml`; DVC's `matrix:`
cannot give each probe stage its own benchmark's dataset or kinds: its parser has no nested
`${...}` and no list-valued fields), and `workflow/Snakefile` makes one rule per entry of the same table, so the two
front-ends cannot disagree on what is stale. `xtra dag --check` says whether dvc.yaml is current.

dvc.yaml begins with one more stage, `check` (`always_changed`): it runs `xtra dag --check --stamp`,
which validates params.yaml, refuses a params file that leaves a schema key out (DVC would not see
it) and a dvc.yaml that is not the stage table of the params, each naming the fix. Every other
stage depends on its small, constant output, so `dvc repro` (or `dvc exp run -S ...`) runs it first
and stops there; when it passes, the unchanged output leaves every other stage as it was.
Snakemake needs no such stage: the Snakefile validates params.yaml when it is parsed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xtra.identity import stage_keys

__all__ = [
    "Stage",
    "REPO",
    "DVC_YAML",
    "REFERENCE_DIR",
    "stage_table",
    "probe_kinds",
    "probed_models",
    "configure_parser",
    "run",
]

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = "dvc.yaml"
REFERENCE_DIR = "xtra/report/reference"  # the published numbers the report draws (report.reference_dir: null)


@dataclass
class Stage:
    """One job of the pipeline: what it runs, reads and writes."""

    name: str  # DVC stage name == Snakemake rule name, e.g. probe-xtra_k2-mnist
    kind: str  # prepare | pretrain | probe | report: its recipe version is xtra/recipes.yaml's <kind>
    cmd: str
    data: list[str] = field(default_factory=list)  # files written by other stages (or the user)
    params: list[str] = field(default_factory=list)  # dotted keys of params.yaml (xtra.identity.stage_keys)
    outs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # outs that are folders
    item: dict[str, str] = field(default_factory=dict)  # dataset / model / benchmark of the stage


# ---------------------------------------------------------------- the stage table


def _manifest(params: dict[str, Any], dataset: str) -> str:
    return f"{params['paths']['prepared']}/{dataset}/manifest.json"


def _model_metrics(params: dict[str, Any], model: str) -> str:
    return f"{params['paths']['models']}/{model}/metrics.json"


def _online_log(params: dict[str, Any], model: str) -> list[str]:
    """A pre-trained model's online probe log (`xtra.train.online`), when its online probes are on."""
    section = params["models"][model]
    on = section["init"] == "pretrain" and section["online_probe"]["kinds"]
    return [f"{params['paths']['models']}/{model}/online.csv"] if on else []


def _prepare(params: dict[str, Any], name: str) -> Stage:
    return Stage(
        f"prepare-{name}",
        "prepare",
        f"xtra prepare {name}",
        params=stage_keys(params, "prepare", dataset=name),
        outs=[_manifest(params, name)],
        item={"dataset": name},
    )


def _pretrain(params: dict[str, Any], name: str) -> Stage:
    """A trained model reads its dataset; a random or pixels model nothing; a converted one (official,
    backbone) its source checkpoint."""
    model = params["models"][name]
    data = []
    if model["init"] == "pretrain":
        data = [_manifest(params, model["dataset"])]
        online = model["online_probe"]
        if online["kinds"] and online["dataset"] is not None:  # the labelled set the online heads train on
            data.append(_manifest(params, online["dataset"]))
    elif model["init"] in ("official", "backbone"):
        data = [str(model["checkpoint"])]
    folder = f"{params['paths']['models']}/{name}"
    return Stage(
        f"pretrain-{name}",
        "pretrain",
        f"xtra pretrain {name}",
        data=data,
        params=stage_keys(params, "pretrain", model=name),
        outs=[f"{folder}/model.pt", *_online_log(params, name)],
        metrics=[f"{folder}/metrics.json"],
        item={"model": name},
    )


def probe_kinds(params: dict[str, Any], model: str, benchmark: str) -> list[str]:
    """The kinds a (model, benchmark) job writes: the benchmark's that the model is probed with."""
    from xtra.model.probes import model_kinds

    return list(model_kinds(params["models"][model]["init"], params["probe"]["benchmarks"][benchmark]["kinds"]))


def _probe(params: dict[str, Any], model: str, bench: str) -> Stage:
    cfg = params["probe"]["benchmarks"][bench]
    kinds = probe_kinds(params, model, bench)
    folder = f"{params['paths']['results']}/probe/{model}"
    return Stage(
        f"probe-{model}-{bench}",
        "probe",
        f"xtra probe {model} --benchmark {bench} --no-ray",
        data=[_model_metrics(params, model), _manifest(params, cfg["dataset"])],
        params=stage_keys(params, "probe", model=model, benchmark=bench, kinds=kinds),
        outs=[f"{folder}/{bench}-{kind}.json" for kind in kinds],
        item={"model": model, "benchmark": bench},
    )


def probed_models(params: dict[str, Any]) -> list[str]:
    return list(params["probe"].get("models") or params["models"])


def _report(params: dict[str, Any], probes: list[Stage]) -> Stage:
    results = params["paths"]["results"]
    models = probed_models(params)
    data = sorted(o for s in probes for o in s.outs) + sorted(_model_metrics(params, m) for m in models)
    data += sorted(log for m in models for log in _online_log(params, m))  # the online_top1 figure's curves
    plots = [f"{results}/plots/{name}.csv" for name in ("top1", "sweep", "loss", "online", "images_seen")]
    reference = (params.get("report") or {}).get("reference_dir") or REFERENCE_DIR
    return Stage(
        "report",
        "report",
        "xtra report",
        data=[*data, reference],
        params=stage_keys(params, "report"),
        outs=[f"{results}/tables", f"{results}/figures", *plots],
        metrics=[f"{results}/metrics.json"],
        dirs=[f"{results}/tables", f"{results}/figures"],
    )


def stage_table(params: dict[str, Any]) -> list[Stage]:
    """Every stage of a validated params dict, in pipeline order."""
    table = [_prepare(params, name) for name in params["datasets"]]
    table += [_pretrain(params, name) for name in params["models"]]
    probes = [
        _probe(params, m, b)
        for m in probed_models(params)
        for b in params["probe"]["benchmarks"]
        if probe_kinds(params, m, b)
    ]
    return table + probes + [_report(params, probes)]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check: params valid and complete, dvc.yaml its stage table (exit 1 if not, naming the fix)",
    )
    parser.add_argument(
        "--stamp",
        metavar="PATH",
        default=None,
        help="with --check: write PATH when it passes (the check stage's output)",
    )
    parser.add_argument(
        "--params-doc",
        action="store_true",
        help="also write docs/params.md (every params key, from the schema) beside the params file",
    )


def run(args: argparse.Namespace) -> int:
    from xtra.config import load_params, size_warnings
    from xtra.pipeline.dvc_yaml import STAMP_TEXT, dvc_yaml_problem, params_problem, share_prepared, write_dvc_yaml

    params = load_params(args.params, check_paths=False)  # an invalid file: ParamsError naming the key
    root = Path(args.params).resolve().parent
    for warning in size_warnings(params):
        print(f"warning: {args.params}: {warning}", file=sys.stderr)
    if args.check:
        problems = [p for p in (params_problem(args.params), dvc_yaml_problem(params, root)) if p]
        problems = problems or [p for p in [share_prepared(params, root)] if p]  # dvc exp run --temp / --queue
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            print("(then run again)", file=sys.stderr)
            return 1
        print(f"{root / DVC_YAML}: current; {args.params}: valid and complete")
        if args.stamp:
            from xtra.atomic import write_atomic

            write_atomic(args.stamp, STAMP_TEXT)
        return 0
    path = write_dvc_yaml(params, root)
    print(f"{path}: {len(stage_table(params))} stages and the check stage")
    if args.params_doc:
        from xtra.atomic import write_atomic
        from xtra.pipeline.params_doc import PARAMS_DOC, render_params_doc

        print(f"{write_atomic(root / PARAMS_DOC, render_params_doc())}: written from the schema")
    return 0
