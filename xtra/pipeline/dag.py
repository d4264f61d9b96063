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
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from xtra.errors import ParamsError

__all__ = [
    "Stage",
    "PLUMBING",
    "NOT_RESULT_KEYS",
    "REPO",
    "DVC_YAML",
    "DISCOVERED",
    "COMMAND_MODULES",
    "code_files",
    "stage_table",
    "probe_kinds",
    "probed_models",
    "result_keys",
    "param_value",
    "identity",
    "configure_parser",
    "run",
]

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = "dvc.yaml"
# Modules every command imports that only parse or check params: not a dependency, so editing the
# CLI does not re-run a 100-epoch pre-training (a params change is what changes a result).
PLUMBING = frozenset(
    {"xtra", "xtra.cli", "xtra.config", "xtra.errors", "xtra.pipeline"}
    | {f"xtra.pipeline.{name}" for name in ("dag", "dvc_yaml", "fill", "params_doc", "profiles")}
)
# Keys of each schema section that change no result (the shards do not depend on num_workers;
# the pre-training is the same for any log or checkpoint cadence or checkpoints kept). The train
# loader's num_workers is a result key: the streaming reader splits each rank's share of an epoch
# into one run per worker, so the batch order depends on it (xtra.train.identity).
NOT_RESULT_KEYS = {
    "dataset": frozenset({"num_workers", "resources"}),
    "train": frozenset(
        {"log_every_n_steps", "checkpoint_every_n_steps", "keep_last_checkpoints", "keep_every_n_steps"}
    ),
    # `kinds`: a probe stage depends on the settings of the kinds it trains only (probe.kinds.<kind>)
    "probe": frozenset({"benchmarks", "models", "num_workers", "resources", "ray", "kinds"}),
    "benchmark": frozenset({"resources"}),
    "report": frozenset(),
}
# The modules that own a registry (xtra.registry) -> the package whose modules it imports (each
# registers itself; no import statement names them): every module of that package is code of a
# stage that imports the registry's module. A test checks this against the registries.
DISCOVERED = {"xtra.data.readers": "xtra.data.readers", "xtra.model.probes": "xtra.model.probe_kinds"}
# The command module of each stage kind (`xtra <kind>`; xtra.cli.COMMANDS names the same, a test
# says so), and the data files (not Python) each one reads.
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


@cache
def code_files(kind: str) -> tuple[str, ...]:
    """Repository files a stage kind's command runs (transitive imports) or reads, sorted.

    Empty files (a bare `__init__.py`) are left out: they change nothing, and DVC warns on them.
    """
    seen: set[Path] = set()
    todo = [COMMAND_MODULES[kind]]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in PLUMBING or path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += list(_imports(path))
        if name in DISCOVERED:
            package = _module_file(DISCOVERED[name])
            todo += [f"{DISCOVERED[name]}.{m.stem}" for m in package.parent.glob("*.py")] if package else []
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
    """The kinds a (model, benchmark) job writes: the benchmark's that the model is probed with."""
    from xtra.model.probes import model_kinds

    return list(model_kinds(params["models"][model]["init"], params["probe"]["benchmarks"][benchmark]["kinds"]))


def _probe(params: dict[str, Any], model: str, bench: str) -> Stage:
    cfg = params["probe"]["benchmarks"][bench]
    kinds = probe_kinds(params, model, bench)
    keys = (
        ["seed", f"models.{model}.arch", f"models.{model}.eval_resize"]
        + [f"probe.{k}" for k in result_keys("probe")]
        + [f"probe.kinds.{kind}" for kind in kinds if kind in params["probe"]["kinds"]]
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
        outs=[f"{folder}/{bench}-{kind}.json" for kind in kinds],
        item={"model": model, "benchmark": bench},
    )


def probed_models(params: dict[str, Any]) -> list[str]:
    return list(params["probe"].get("models") or params["models"])


def _report(params: dict[str, Any], probes: list[Stage]) -> Stage:
    results, models = params["paths"]["results"], params["paths"]["models"]
    data = sorted(o for s in probes for o in s.outs) + sorted(
        f"{models}/{m}/metrics.json" for m in probed_models(params)
    )
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
    from xtra.config import load_params
    from xtra.pipeline.dvc_yaml import STAMP_TEXT, dvc_yaml_problem, params_problem, write_dvc_yaml

    params = load_params(args.params, check_paths=False)  # an invalid file: ParamsError naming the key
    root = Path(args.params).resolve().parent
    if args.check:
        problems = [p for p in (params_problem(args.params), dvc_yaml_problem(params, root)) if p]
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
