"""The pipeline's stages, computed once from params for both DAG front-ends.

`stage_table(params)` lists every stage of the run: one `prepare` per dataset, one `pretrain` per
model, one `probe` per (probed model, benchmark) and one `report`, each with exactly what its
result depends on:

- data: the prepared dataset's `manifest.json` (it records every shard's sha256, so it stands
  for the shards without hashing them), the model's `model.pt` (never a checkpoint), the
  source checkpoint of an `init: official` model, the result JSONs and metrics of the report;
- code: every `xtra` module the stage's command imports, found by reading the imports
  (`code_files`), plus the data files a stage reads (the report's reference CSVs); the CLI
  plumbing that only checks params (`PLUMBING`) is left out;
- params: the keys that can change the stage's result. `resources`, worker counts, logging and
  checkpoint cadence, `probe.ray` and `probe.models` are none of them (`NOT_RESULT_KEYS`).

`dvc.yaml` is this table written out by `xtra dag` (DVC's `matrix:` cannot give each probe stage
its own benchmark's dataset or kinds: its parser has no nested `${...}` and no list-valued
fields), and `workflow/Snakefile` makes one rule per entry of the same table, so the two
front-ends cannot disagree on what is stale. `xtra dag --check` says whether dvc.yaml is current.
"""

from __future__ import annotations

import argparse
import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml

from xtra.errors import ParamsError

__all__ = [
    "Stage",
    "PLUMBING",
    "NOT_RESULT_KEYS",
    "REPO",
    "DVC_YAML",
    "STAGE_COMMANDS",
    "code_files",
    "stage_table",
    "probe_kinds",
    "probed_models",
    "result_keys",
    "param_value",
    "identity",
    "render_dvc_yaml",
    "dvc_yaml_problem",
    "write_dvc_yaml",
    "check_under_dvc",
    "configure_parser",
    "run",
]

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = "dvc.yaml"
# Modules every command imports that only parse or check params: not a dependency, so editing the
# CLI does not re-run a 100-epoch pre-training (a params change is what changes a result).
PLUMBING = frozenset({"xtra", "xtra.cli", "xtra.config", "xtra.errors", "xtra.profiles", "xtra.dag"})
# Keys of each schema section that change no result (the shards do not depend on num_workers;
# the pre-training is the same for any log or checkpoint cadence or checkpoints kept). The train
# loader's num_workers is a result key: the streaming reader splits each rank's share of an epoch
# into one run per worker, so the batch order depends on it (xtra.train.identity).
NOT_RESULT_KEYS = {
    "dataset": frozenset({"num_workers", "resources"}),
    "train": frozenset(
        {"log_every_n_steps", "checkpoint_every_n_steps", "keep_last_checkpoints", "keep_every_n_steps"}
    ),
    "probe": frozenset({"benchmarks", "models", "num_workers", "resources", "ray"}),
    "benchmark": frozenset({"resources"}),
    "report": frozenset(),
}
# The command module of each stage kind, and the data files (not Python) each one reads.
COMMAND_MODULES = {
    "prepare": "xtra.data.prepare",
    "pretrain": "xtra.train.pretrain",
    "probe": "xtra.probe.cli",
    "report": "xtra.report.cli",
}
DATA_FILES = {"report": ("xtra/report/reference",)}


@dataclass
class Stage:
    """One job of the pipeline: what it runs, reads and writes."""

    name: str  # DVC stage name == Snakemake rule name, e.g. probe-xtra_k2-mnist
    kind: str  # prepare | pretrain | probe | report
    cmd: str
    data: list[str] = field(default_factory=list)  # files written by other stages (or the user)
    code: list[str] = field(default_factory=list)  # repository files
    params: list[str] = field(default_factory=list)  # dotted keys of params.yaml
    outs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # outs that are folders
    item: dict[str, str] = field(default_factory=dict)  # dataset / model / benchmark of the stage


# ---------------------------------------------------------------- code dependencies


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> Iterator[str]:
    """The xtra modules a file imports, also inside functions (lazy imports count)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "xtra":
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "xtra")


def _command_module(kind: str) -> str:
    from xtra.cli import COMMANDS  # the module each `xtra <kind>` runs (after a merge too)

    return COMMANDS[kind][0] if kind in COMMANDS else COMMAND_MODULES[kind]


@cache
def code_files(kind: str) -> tuple[str, ...]:
    """Repository files a stage kind's command runs (transitive imports) or reads, sorted.

    Empty files (a bare `__init__.py`) are left out: they change nothing, and DVC warns on them.
    """
    seen: set[Path] = set()
    todo = [_command_module(kind)]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in PLUMBING or path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += list(_imports(path))
    files = {p.relative_to(REPO).as_posix() for p in seen if p.stat().st_size}
    return tuple(sorted(files | set(DATA_FILES.get(kind, ()))))


# ---------------------------------------------------------------- params dependencies


@lru_cache(maxsize=1)
def _schema_defs() -> dict[str, Any]:
    from xtra.config import load_schema

    return load_schema()["$defs"]


def result_keys(section: str) -> list[str]:
    """The keys of a schema section (`dataset`, `train`, `probe`, `benchmark`) that change results."""
    if section == "report":
        from xtra.config import load_schema

        props = load_schema()["properties"]["report"]["properties"]
    else:
        props = _schema_defs()[section]["properties"]
    return [k for k in props if k not in NOT_RESULT_KEYS[section]]


def param_value(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params: {key} is not set (run `xtra profile --fill` to write every schema key)")
        node = node[part]
    return node


def identity(params: dict[str, Any], stage: Stage) -> str:
    """sha256 of the values of the stage's params keys: its params identity (Snakemake's `params`)."""
    from xtra.config import params_hash

    return params_hash({key: param_value(params, key) for key in stage.params})


# ---------------------------------------------------------------- the stage table


def _manifest(params: dict[str, Any], dataset: str) -> str:
    return f"{params['paths']['prepared']}/{dataset}/manifest.json"


def _prepare(params: dict[str, Any], name: str) -> Stage:
    return Stage(
        f"prepare-{name}",
        "prepare",
        f"xtra prepare {name}",
        code=list(code_files("prepare")),
        params=[f"datasets.{name}.{k}" for k in result_keys("dataset")],
        outs=[_manifest(params, name)],
        item={"dataset": name},
    )


def _pretrain(params: dict[str, Any], name: str) -> Stage:
    """A trained model reads its dataset and its training recipe; a random or pixels model only its
    architecture and the seed; a converted one (official, backbone) its source checkpoint."""
    model, where = params["models"][name], f"models.{name}"
    keys, data = ["seed", f"{where}.init", f"{where}.arch"], []
    if model["init"] == "pretrain":
        keys += [f"{where}.dataset"] + [f"{where}.train.{k}" for k in result_keys("train")]
        data = [_manifest(params, model["dataset"])]
    elif model["init"] == "official":
        keys += [f"{where}.checkpoint", f"{where}.drop_prefixes"]
        data = [str(model["checkpoint"])]
    elif model["init"] == "backbone":
        keys += [f"{where}.checkpoint", f"{where}.backbone"]
        data = [str(model["checkpoint"])]
    folder = f"{params['paths']['models']}/{name}"
    return Stage(
        f"pretrain-{name}",
        "pretrain",
        f"xtra pretrain {name}",
        data=data,
        code=list(code_files("pretrain")),
        params=keys,
        outs=[f"{folder}/model.pt"],
        metrics=[f"{folder}/metrics.json"],
        item={"model": name},
    )


def probe_kinds(params: dict[str, Any], model: str, benchmark: str) -> list[str]:
    """The kinds a (model, benchmark) job writes: the benchmark's, only linear for a pixels model."""
    kinds = list(params["probe"]["benchmarks"][benchmark]["kinds"])
    return [k for k in kinds if k == "linear"] if params["models"][model]["init"] == "pixels" else kinds


def _probe(params: dict[str, Any], model: str, bench: str) -> Stage:
    cfg = params["probe"]["benchmarks"][bench]
    keys = (
        ["seed", f"models.{model}.arch", f"models.{model}.eval_resize"]
        + [f"probe.{k}" for k in result_keys("probe")]
        + [f"probe.benchmarks.{bench}.{k}" for k in result_keys("benchmark")]
    )
    folder = f"{params['paths']['results']}/probe/{model}"
    return Stage(
        f"probe-{model}-{bench}",
        "probe",
        f"xtra probe {model} --benchmark {bench} --no-ray",
        data=[f"{params['paths']['models']}/{model}/model.pt", _manifest(params, cfg["dataset"])],
        code=list(code_files("probe")),
        params=keys,
        outs=[f"{folder}/{bench}-{kind}.json" for kind in probe_kinds(params, model, bench)],
        item={"model": model, "benchmark": bench},
    )


def probed_models(params: dict[str, Any]) -> list[str]:
    return list(params["probe"].get("models") or params["models"])


def _report(params: dict[str, Any], probes: list[Stage]) -> Stage:
    results, models = params["paths"]["results"], params["paths"]["models"]
    data = [o for s in probes for o in s.outs] + [f"{models}/{m}/metrics.json" for m in probed_models(params)]
    plots = [f"{results}/plots/{name}.csv" for name in ("top1", "sweep", "loss", "images_seen")]
    ref = (params.get("report") or {}).get("reference_dir")
    code = [c for c in code_files("report") if not (ref and c == "xtra/report/reference")] + ([ref] if ref else [])
    return Stage(
        "report",
        "report",
        "xtra report",
        data=data,
        code=sorted(code),
        params=["probe.protocol"] + [f"report.{k}" for k in result_keys("report")],
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


# ---------------------------------------------------------------- dvc.yaml

_HEADER = """\
# dvc.yaml: WRITTEN BY `xtra dag` from params.yaml and xtra/dag.py (do not edit; `xtra profile NAME`
# rewrites it, and `xtra dag --check` says whether it is current). The local front-end of the
# pipeline; workflow/Snakefile makes one rule per stage of the same table (xtra/dag.py).
#
#   dvc repro                          # everything that is out of date
#   dvc exp run -S 'models.xtra_k2.arch.block_size=1'    # an ablation (docs/ABLATIONS.md)
#   dvc metrics show; dvc plots show
#
# Staleness (the same rule as Snakemake's): each stage depends on exactly the params keys that can
# change its result (never `resources`, worker counts, log/checkpoint cadence, `probe.ray`), on the
# code its command imports, and on the files it reads: the prepared dataset's manifest.json, the
# model's model.pt (checkpoints are never a dependency), the result JSONs and metrics.
# params.yaml spells out every schema key (`xtra profile --fill`), so the values a command uses
# are the ones DVC compares, and `dvc exp run -S` can override any of them.
#
# No copies of large data (.dvc/config: cache type reflink,hardlink,symlink, never a copy):
# - prepare: the output is the dataset's manifest.json, `cache: false` and `persist: true`. The
#   shards beside it (hundreds of GB) are no DVC output at all: never hashed by `dvc status`,
#   never copied into .dvc/cache, never deleted before `xtra prepare` runs (it decides itself
#   whether they are current). The manifest holds every shard's sha256, so depending on it is
#   depending on the shards. `dvc push`/`pull` do not carry prepared data: re-prepare it from the
#   raw data, or point `paths.prepared` at a shared copy.
# - pretrain: model.pt (the weights-only artifact) and metrics.json are cached (linked, not
#   copied), so `dvc push` shares the trained model and `dvc exp apply` restores it. The resumable
#   checkpoints in models/<model>/checkpoints/ are no output: DVC never hashes, caches or deletes
#   them, and an interrupted run resumes from them.
# - probe: one stage per (model, benchmark); its result JSONs are cached (small), so a failed job
#   leaves every other stage's results in place and committed; its resumable state in
#   results/probe-state/ is no output.
# - report: tables, figures, metrics and plot data are cached (small; results/ is git-ignored, so
#   the cache is what lets `dvc exp show` and `dvc metrics diff` read past runs).
# Raw data (`datasets.*.root`) is not a dependency: hashing terabytes on every `dvc status` is not
# affordable. After changing raw files, re-prepare with `dvc repro -f prepare-NAME`.
"""

_PLOTS = [
    {"{results}/plots/top1.csv": {"template": "bar_horizontal", "x": "top1", "y": "key"}},
    {"{results}/plots/sweep.csv": {"template": "scatter", "x": "lr", "y": "top1"}},
    {"{results}/plots/loss.csv": {"x": "step", "y": "loss"}},
    {"{results}/plots/images_seen.csv": {"template": "scatter", "x": "images_seen", "y": "top1"}},
    "{results}/figures/top1_bars.png",
    "{results}/figures/lr_sweep.png",
    "{results}/figures/pretrain_loss.png",
]


def _dvc_stage(stage: Stage) -> dict[str, Any]:
    entry: dict[str, Any] = {"cmd": stage.cmd, "deps": stage.data + stage.code, "params": stage.params}
    if stage.kind == "prepare":
        entry["outs"] = [{o: {"cache": False, "persist": True}} for o in stage.outs]
    else:
        entry["outs"] = list(stage.outs)
    if stage.metrics:
        entry["metrics"] = list(stage.metrics)
    return entry


def render_dvc_yaml(params: dict[str, Any]) -> str:
    """The text of dvc.yaml for a validated params dict."""
    stages = {s.name: _dvc_stage(s) for s in stage_table(params)}
    results = params["paths"]["results"]
    plots = [
        {k.format(results=results): v for k, v in p.items()} if isinstance(p, dict) else p.format(results=results)
        for p in _PLOTS
    ]
    body = yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
    return _HEADER + "\n" + body


def dvc_yaml_problem(params: dict[str, Any], root: Path) -> str | None:
    """Why `root/dvc.yaml` is not the one params make (None when it is)."""
    path = Path(root) / DVC_YAML
    expected = render_dvc_yaml(params)
    if not path.is_file():
        return f"{path} is missing: run `xtra dag` to write it"
    if path.read_text() != expected:
        return (
            f"{path} is not the stage table of the current params (a dataset, model, benchmark, kind "
            f"or path changed, or the code's imports): run `xtra dag` to rewrite it"
        )
    return None


STAGE_COMMANDS = frozenset(COMMAND_MODULES)


def check_under_dvc(command: str, params_file: str, environ: dict[str, str] | None = None) -> None:
    """Inside `dvc repro` / `dvc exp run` (DVC sets DVC_STAGE), refuse to run a stage when the params
    file leaves a schema key to its default (DVC would not see it), or when dvc.yaml is not the
    stage table of the params: a `-S` override can change the table (a benchmark, a model's init),
    and DVC would then run and record the wrong stages."""
    environ = dict(os.environ if environ is None else environ)
    if command not in STAGE_COMMANDS or "DVC_STAGE" not in environ:
        return
    from xtra.config import load_params
    from xtra.fill import missing_keys

    missing = missing_keys(Path(params_file).read_text())
    if missing:  # DVC would run the stage, then refuse to record it (MissingParamsError)
        raise ParamsError(
            f"stage {environ['DVC_STAGE']}: {params_file} leaves out {missing[:6]}: DVC sees only what "
            f"the file spells out. Run `xtra profile --fill` to write every schema key into it"
        )
    root = Path(environ.get("DVC_ROOT") or Path(params_file).resolve().parent)
    problem = dvc_yaml_problem(load_params(params_file, check_paths=False), root)
    if problem:
        raise ParamsError(f"stage {environ['DVC_STAGE']}: {problem} (then `dvc repro` again)")


def write_dvc_yaml(params: dict[str, Any], root: Path) -> Path:
    from xtra.atomic import write_atomic

    return write_atomic(Path(root) / DVC_YAML, render_dvc_yaml(params))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="only say whether dvc.yaml is current (exit 1 if not)")


def run(args: argparse.Namespace) -> int:
    from xtra.config import load_params

    params = load_params(args.params, check_paths=False)
    root = Path(args.params).resolve().parent
    if args.check:
        problem = dvc_yaml_problem(params, root)
        print(problem or f"{root / DVC_YAML}: current")
        return 1 if problem else 0
    path = write_dvc_yaml(params, root)
    print(f"{path}: {len(stage_table(params))} stages")
    return 0
