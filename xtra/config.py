"""params.yaml: strict validation against the JSON schema, defaults, and cross-field checks.

`load_params(path)` returns the params as a plain nested dict with every default filled in (the
DAG hashes its values); each stage builds its typed config from it once (`xtra.data.config`,
`xtra.train.config`, `xtra.probe.config`, `xtra.report.config`). Any problem raises `ParamsError`
naming the file and the key (`models.xtra_k2.arch.block_size`). The schema is the one home of
every default and enum: `schema_section` and `section_defaults` read them for the typed configs.
`xtra validate` is the command-line face of the same checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators

from xtra.errors import ParamsError
from xtra.yamlio import read_yaml

__all__ = [
    "SCHEMA_PATH",
    "SCHEDULER_ENV",
    "RENAMED_KEYS",
    "renamed_keys",
    "load_params",
    "validate_params",
    "load_schema",
    "schema_section",
    "section_defaults",
    "PROFILE_DEFAULTS",
    "profile_defaults",
    "size_warnings",
    "params_hash",
    "model_arch",
    "launch_problems",
    "configure_parser",
    "run",
]

SCHEMA_PATH = Path(str(resources.files("xtra") / "schema" / "params.schema.yaml"))
# Variables a Slurm or LSF job step sets: Lightning starts a multi-node run only inside one of them
# (SLURMEnvironment / LSFEnvironment); elsewhere it waits for processes that never come.
SCHEDULER_ENV = ("SLURM_NTASKS", "LSB_JOBID")


# Keys that were renamed (one word per concept: `num_heads` are attention heads, a `head` alone is a probe
# head, the per-kind probe settings live under `probe.kinds.<kind>`): section (`*`: any name) -> {old
# key: new key, relative to the section}. A params file with an old key is refused, naming the new one.
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "models.*.arch": {"heads": "num_heads", "predictor_heads": "predictor_num_heads"},
    "probe": {
        "attn_heads": "kinds.attentive.num_heads",
        "num_last_blocks": "kinds.attentive.num_last_blocks",
        "linear_weight_decays": "kinds.linear.weight_decays",
        "attentive_weight_decays": "kinds.attentive.weight_decays",
        "augmentation": "kinds.<kind>.augmentation",
    },
}


def renamed_keys(params: Any) -> list[str]:
    """`old key: renamed to new key` for every renamed key `params` still uses (see RENAMED_KEYS)."""
    found = []
    for section, renames in RENAMED_KEYS.items():
        nodes = [("", params)]  # (dotted prefix, mapping) of every match of the section so far
        for part in section.split("."):
            children = []
            for where, parent in nodes:
                if isinstance(parent, dict):
                    items = parent.items() if part == "*" else [(part, parent[part])] if part in parent else []
                    children += [(f"{where}{name}.", child) for name, child in items]
            nodes = children
        for where, node in nodes:
            if isinstance(node, dict):
                found += [f"{where}{old}: renamed to {where}{new}" for old, new in renames.items() if old in node]
    return found


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The parsed schema (cached; treat it as read-only)."""
    return read_yaml(SCHEMA_PATH.read_text(), str(SCHEMA_PATH))


def _resolve_local_ref(ref: str) -> dict[str, Any]:
    """The schema node a local reference (`#/$defs/name`) points to."""
    node: Any = load_schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def schema_section(section: str) -> dict[str, Any]:
    """The schema of a params section, its `$ref`s followed: a `$defs` name (`train`, `dataset`, `arch`,
    `probe`, `benchmark`, ...) or a top-level key (`report`, `paths`)."""
    schema = load_schema()
    node = schema["$defs"][section] if section in schema["$defs"] else schema["properties"][section]
    while "$ref" in node:
        node = {**_resolve_local_ref(node["$ref"]), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def section_defaults(section: str) -> dict[str, Any]:
    """The schema's default of every key of a section that has one (fresh copies)."""
    props = schema_section(section).get("properties", {})
    return {k: json.loads(json.dumps(v["default"])) for k, v in props.items() if "default" in v}


# The sections of named entries (a dataset, a model, a benchmark) complete a key an entry leaves out
# from the others first: the value most of the section's other entries give it is the active profile's
# default (a benchmark added to the demo gets the demo's epochs, batch and grid, not the schema's
# paper-scale ones); the schema's default applies only where no other entry gives one. Per section:
# (the schema's definition of an entry, the keys that say which data or file an entry is and never
# come from another, the keys completed key by key: a model's `train`; its `arch` is taken only
# whole, since a preset decides the sizes that other entries' width or depth would contradict).
PROFILE_DEFAULTS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "datasets": ("dataset", frozenset({"root", "split_lists", "layout", "partition", "heldout_fraction"}), frozenset()),
    "models": (
        "model",
        frozenset({"init", "dataset", "checkpoint", "drop_prefixes", "backbone"}),
        frozenset({"train"}),
    ),
    "probe.benchmarks": ("benchmark", frozenset(), frozenset()),
}
_ABSENT = object()


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def profile_defaults(params: Any) -> dict[str, Any]:
    """{dotted key: value} of every key an entry of `PROFILE_DEFAULTS` leaves out and the other entries
    of its section give: the value most of them give (the first of those, in file order, when tied)."""
    found: dict[str, Any] = {}
    for section, (definition, own, per_key) in PROFILE_DEFAULTS.items():
        entries = _lookup(params, section)
        if not isinstance(entries, dict):
            continue
        props = schema_section(definition)["properties"]
        keys = [k for k in props if k not in own and k not in per_key and "default" in _resolved(props[k])]
        keys += [
            f"{k}.{sub}" for k in per_key for sub, spec in schema_section(k)["properties"].items() if "default" in spec
        ]
        for name, entry in entries.items():
            for key in keys:
                if not isinstance(entry, dict) or _lookup(entry, key) is not _ABSENT:
                    continue
                given = [v for other, e in entries.items() if other != name and (v := _lookup(e, key)) is not _ABSENT]
                same = [json.dumps(v, sort_keys=True) for v in given]  # equal values compare equal
                if given:
                    most = max(range(len(given)), key=lambda i: same.count(same[i]))  # the first of the most
                    found[f"{section}.{name}.{key}"] = json.loads(json.dumps(given[most]))
    return found


def _resolved(node: dict[str, Any]) -> dict[str, Any]:
    return {**_resolve_local_ref(node["$ref"]), **node} if "$ref" in node else node


def _with_defaults(cls):
    """A validator class that also fills in the schema's defaults (jsonschema's documented recipe)."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema callback
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = json.loads(json.dumps(sub["default"]))
                elif "$ref" in sub and name not in instance:
                    target = _resolve_local_ref(sub["$ref"])
                    if "default" in target:
                        instance[name] = json.loads(json.dumps(target["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(Draft202012Validator)


def _key(path: Iterator[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error) -> str:  # noqa: ANN001 - a jsonschema ValidationError
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        known = sorted(error.schema.get("properties", {}))
        return f"{where}: unknown key(s) {extra}" + (f"; known keys: {known}" if known else "")
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def validate_params(params: dict[str, Any], source: str = "params.yaml", check_paths: bool = True) -> dict:
    """Validate in place (filling defaults: the other entries' of a section, `profile_defaults`, then the
    schema's) and return `params`; raise ParamsError naming the key."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(params).__name__}")
    renamed = renamed_keys(params)
    if renamed:
        raise ParamsError(f"{source}: invalid params:\n  " + "\n  ".join(renamed))
    for key, value in profile_defaults(params).items():  # before the schema's defaults
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    errors = sorted(_Validator(load_schema()).iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors[:10])
        raise ParamsError(f"{source}: invalid params:\n  {lines}")
    problems = list(_cross_checks(params, check_paths))
    if problems:
        raise ParamsError(f"{source}: invalid params:\n  " + "\n  ".join(problems))
    return params


def _cross_checks(params: dict[str, Any], check_paths: bool) -> Iterator[str]:
    from xtra.data.readers import READERS
    from xtra.model.arch import ArchConfig

    datasets = params["datasets"]
    for name, ds in datasets.items():
        if ds["kind"] not in READERS:
            yield f"datasets.{name}.kind: unknown dataset kind {ds['kind']!r}; known: {', '.join(READERS.names())}"
        elif not READERS[ds["kind"]].embedded:  # a kind whose data ships inside a package needs no root
            if not ds.get("root"):
                yield f"datasets.{name}.root: required for kind {ds['kind']!r}"
            elif check_paths and not Path(ds["root"]).exists():
                yield f"datasets.{name}.root: path {ds['root']!r} does not exist"
    for name, model in params["models"].items():
        where = f"models.{name}"
        try:
            ArchConfig.from_dict(model["arch"])
        except ParamsError as exc:
            yield f"{where}.arch: {exc}"
        if model["init"] == "pretrain" and model.get("dataset") not in datasets:
            yield f"{where}.dataset: {model.get('dataset')!r} is not a dataset of this params file"
        if model["init"] in ("official", "backbone"):
            ckpt = model.get("checkpoint")
            if not ckpt:
                yield f"{where}.checkpoint: required for init {model['init']!r}"
            elif check_paths and not Path(ckpt).exists():
                yield f"{where}.checkpoint: path {ckpt!r} does not exist"
        if (model["init"] == "backbone") != (model.get("backbone") is not None):
            yield f"{where}.backbone: required for init 'backbone', and for no other init (init is {model['init']!r})"
        online = model["online_probe"]
        if online["kinds"] and model["init"] != "pretrain":
            yield f"{where}.online_probe.kinds: online probes train during pre-training; init is {model['init']!r}"
        if online["dataset"] is not None and online["dataset"] not in datasets:
            yield f"{where}.online_probe.dataset: {online['dataset']!r} is not a dataset of this params file"
    yield from _probe_checks(params["probe"], datasets, params["models"])
    yield from _split_checks(params, check_paths)


def _probe_checks(probe: dict[str, Any], datasets: dict[str, Any], models: dict[str, Any]) -> Iterator[str]:
    """Benchmarks name datasets of params and probe kinds of the registry, each with its settings."""
    from xtra.model.probes import PROBE_KINDS  # the registry (its kinds' modules import torch)

    for name in probe["kinds"]:
        if name not in PROBE_KINDS:
            yield f"probe.kinds.{name}: unknown probe kind {name!r}; known: {', '.join(PROBE_KINDS.names())}"
    for name, bench in probe["benchmarks"].items():
        if bench["dataset"] not in datasets:
            yield f"probe.benchmarks.{name}.dataset: {bench['dataset']!r} is not a dataset of this params file"
        for kind in bench["kinds"]:
            if kind not in PROBE_KINDS:
                yield (
                    f"probe.benchmarks.{name}.kinds: unknown probe kind {kind!r}; "
                    f"known: {', '.join(PROBE_KINDS.names())}"
                )
    for name, model in models.items():
        for kind in model["online_probe"]["kinds"]:
            if kind not in PROBE_KINDS:
                yield (
                    f"models.{name}.online_probe.kinds: unknown probe kind {kind!r}; "
                    f"known: {', '.join(PROBE_KINDS.names())}"
                )
    for name in probe.get("models") or []:
        if name not in models:
            yield f"probe.models: {name!r} is not a model of this params file"


def _split_checks(params: dict[str, Any], check_paths: bool) -> Iterator[str]:
    """Each split a benchmark (or a pre-training's validation) reads is one its dataset's kind writes
    (`xtra.data.readers.DatasetKind.splits`; a kind whose splits depend on its files is asked only
    when paths are checked)."""
    from xtra.data.readers import READERS

    datasets = params["datasets"]
    reads = [
        (f"probe.benchmarks.{name}.{key}", bench["dataset"], bench[key])
        for name, bench in params["probe"]["benchmarks"].items()
        for key in ("train_split", "eval_split")
    ] + [
        (f"models.{name}.train.val_split", model["dataset"], model["train"]["val_split"])
        for name, model in params["models"].items()
        if model["init"] == "pretrain" and model["train"]["val_every_n_steps"] > 0
    ]
    for key, dataset, split in reads:
        ds = datasets.get(dataset)
        if ds is None or ds["kind"] not in READERS:
            continue  # named by the checks above
        splits = READERS[ds["kind"]].splits_of(ds, look=check_paths)
        if splits is not None and split not in splits:
            yield (
                f"{key}: dataset {dataset!r} (kind {ds['kind']}) has no split {split!r}; "
                f"its splits: {', '.join(splits)}"
            )


def size_warnings(params: dict[str, Any]) -> list[str]:
    """Datasets stored smaller than a model reads them (validated params): each image would be upsampled.

    A model reads a dataset at its `eval_resize` (the evaluation resize before the centre crop, and the
    probes' training transform without augmentation) and crops `arch.img_size`; `image_size` is the
    shorter side the shards store (0: the originals, not known here)."""
    datasets, models = params["datasets"], params["models"]
    reads = [
        (b["dataset"], m, f"probe.benchmarks.{n}")
        for n, b in params["probe"]["benchmarks"].items()
        for m in params["probe"].get("models") or models
    ]
    reads += [
        (model["dataset"], m, f"models.{m}.dataset") for m, model in models.items() if model["init"] == "pretrain"
    ]
    warnings, seen = [], set()
    for dataset, model, via in reads:
        stored = datasets[dataset]["image_size"] if dataset in datasets else 0
        needed = max(models[model]["eval_resize"], models[model]["arch"]["img_size"])
        if 0 < stored < needed and (dataset, model) not in seen:
            seen.add((dataset, model))
            warnings.append(
                f"datasets.{dataset}.image_size is {stored}, but model {model} reads it at {needed} px "
                f"(models.{model}.eval_resize / arch.img_size; {via}): every image is upsampled. Prepare it "
                f"at image_size >= {needed} (or 0 to keep the originals)"
            )
    return warnings


def load_params(path: str | Path = "params.yaml", check_paths: bool = True) -> dict[str, Any]:
    """Read (`read_yaml`), validate and default-fill a params file. Raises ParamsError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"cannot read params file {path}: {exc.strerror}") from exc
    return validate_params(read_yaml(text, str(path)), str(path), check_paths)


def params_hash(section: Any) -> str:
    """sha256 of a params section in canonical JSON: what a stage's cache key is made of."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_arch(params: dict[str, Any], model: str) -> dict[str, Any]:
    if model not in params["models"]:
        raise ParamsError(f"models.{model}: no such model; known: {sorted(params['models'])}")
    return params["models"][model]["arch"]


def launch_problems(
    params: dict[str, Any], source: str = "params.yaml", environ: dict[str, str] | None = None
) -> list[str]:
    """Why a pre-training of `params` cannot start on this machine (num_nodes > 1 outside a
    scheduler job), each with the fix; empty when it can."""
    environ = dict(os.environ if environ is None else environ)
    if any(environ.get(name) for name in SCHEDULER_ENV):
        return []
    problems = []
    for name, model in params["models"].items():
        train = model.get("train") or {}
        nodes, devices = int(train.get("num_nodes", 1)), train.get("devices", 1)
        waits = (
            f"{nodes * devices} processes ({nodes} nodes x {devices})"
            if isinstance(devices, int)
            else f"the processes of {nodes} nodes"
        )
        if model.get("init", "pretrain") == "pretrain" and nodes > 1:
            problems.append(
                f"{source}: models.{name}.train.num_nodes is {nodes}, but this is no Slurm or LSF job "
                f"({' / '.join(SCHEDULER_ENV)} unset): Lightning would wait for {waits} "
                f"forever. Run it on the cluster with `snakemake --profile workflow/profiles/slurm` (or lsf), "
                f"or on this one node with `xtra profile {params.get('profile', 'NAME')} --set "
                f"models.{name}.train.num_nodes=1` (raise accumulate_grad_batches to keep the global batch)"
            )
    return problems


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--no-paths",
        action="store_true",
        help="check the file only, not this machine: no dataset/checkpoint paths, no scheduler "
        "environment for num_nodes > 1",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, check_paths=not args.no_paths)
    problems = [] if args.no_paths else launch_problems(params, args.params)
    if problems:
        raise ParamsError("\n".join(problems))
    for warning in size_warnings(params):
        print(f"warning: {args.params}: {warning}", file=sys.stderr)
    print(
        f"{args.params}: valid (profile {params['profile']!r}, {len(params['datasets'])} datasets, "
        f"{len(params['models'])} models, {len(params['probe']['benchmarks'])} benchmarks)"
    )
    return 0
