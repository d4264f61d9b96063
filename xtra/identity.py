"""What identifies each stage's result: its recipe version, the params keys that matter, its inputs.

Three parts, one home (both DAG front-ends and every stage command read them from here):

- **Recipe versions** (`xtra/recipes.yaml`, package data): one integer per stage kind. A change of a
  stage's numerics bumps its version (the golden tests, keyed by version, enforce it); a refactor
  changes nothing. DVC reads the file as a params file of every stage, Snakemake through
  `params_identity`, so a bump re-runs the stages of that kind and nothing else does.
- **The keys that matter** (`stage_keys`): for each stage, the dotted params keys that can change its
  result. `NOT_RESULT_KEYS` are the keys of each schema section that change none (resources,
  cadences, worker counts, where a job runs); a pre-training depends on the keys of its trajectory
  (`TRAIN_TRAJECTORY_KEYS`, the arch but `ARCH_NON_TRAJECTORY_KEYS`), its length (`RUN_LENGTH_KEYS`)
  and its world size (`WORLD_SIZE_KEYS`), not on validation, reconstruction, strategy or accelerator
  settings, which shape no byte of model.pt.
- **The identity of a result** (`stage_identity`): sha256 of {stage kind, recipe version, the values
  of its keys, the identities of its inputs}. Inputs count by identity, not bytes: a prepared dataset
  by its content (`dataset_identity`: every shard's sha256 and the classes, from the manifest), a
  model by its model identity (a pre-trained one: `model_identity` of its run, steps and schedule
  segments; any other: `stage_identity` of its keys and source file). Each command writes the
  identity into its outputs and decides reuse by it: an output with the same identity is left as it
  is, a run or state of another identity is never resumed.

Torch-free: the DAG front-ends import it when they plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from xtra.config import load_schema, params_hash
from xtra.errors import ParamsError

__all__ = [
    "RECIPES_FILE",
    "STAGE_KINDS",
    "NOT_RESULT_KEYS",
    "TRAIN_TRAJECTORY_KEYS",
    "ARCH_NON_TRAJECTORY_KEYS",
    "RUN_LENGTH_KEYS",
    "WORLD_SIZE_KEYS",
    "recipe_versions",
    "recipe_version",
    "result_keys",
    "param_value",
    "stage_keys",
    "key_values",
    "params_identity",
    "stage_identity",
    "dataset_identity",
    "model_identity",
]

RECIPES_FILE = Path(__file__).with_name("recipes.yaml")
STAGE_KINDS = ("prepare", "pretrain", "probe", "report")

# Keys of each schema section that change no result: the shards do not depend on num_workers; a
# pre-training's model.pt does not depend on its logging, checkpoint or validation cadence, its
# reconstruction grid, its DDP strategy or accelerator; a probe result not on where and how fast
# its job runs (`benchmarks.*.devices`: the same up to summation order, like the loader workers).
NOT_RESULT_KEYS = {
    "dataset": frozenset({"num_workers", "resources"}),
    "train": frozenset(
        {
            "num_workers",
            "log_every_n_steps",
            "checkpoint_every_n_steps",
            "keep_last_checkpoints",
            "keep_every_n_steps",
            "val_every_n_steps",
            "val_split",
            "val_batches",
            "reconstruct_images",
            "strategy",
            "accelerator",
        }
    ),
    # `kinds`: a probe stage depends on the settings of the kinds it trains only (probe.kinds.<kind>)
    "probe": frozenset({"benchmarks", "models", "num_workers", "resources", "ray", "kinds"}),
    "benchmark": frozenset({"resources", "devices"}),
    "report": frozenset(),
}
# A pre-training run (its checkpoint folder, `xtra.train.identity.run_id`) is the trajectory: these
# train keys, the arch but its attention kernel, the world size, the data's identity, the seed and
# the recipe version. Not the loader workers: the batch order does not depend on them (xtra.data.streaming).
TRAIN_TRAJECTORY_KEYS = (
    "batch_size",
    "accumulate_grad_batches",
    "lr",
    "warmup_start_lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "betas",
    "grad_clip",
    "precision",
    "loader",
)
ARCH_NON_TRAJECTORY_KEYS = ("attn_impl",)  # the same mask computed by another kernel
# Not in the run (a longer run continues it) but in the model: how far it went.
RUN_LENGTH_KEYS = ("epochs", "max_steps")
WORLD_SIZE_KEYS = ("devices", "num_nodes")  # the trainer's world size is part of the run


@cache
def recipe_versions() -> dict[str, int]:
    """{stage kind: recipe version} from `xtra/recipes.yaml`; a malformed file is a ParamsError naming it."""
    try:
        versions = yaml.safe_load(RECIPES_FILE.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{RECIPES_FILE}: cannot read the recipe versions: {exc}") from exc
    if not isinstance(versions, dict) or sorted(versions) != sorted(STAGE_KINDS):
        raise ParamsError(f"{RECIPES_FILE}: expected one version for each of {list(STAGE_KINDS)}, got {versions!r}")
    bad = {k: v for k, v in versions.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ParamsError(f"{RECIPES_FILE}: recipe versions are positive integers: {bad}")
    return dict(versions)


def recipe_version(kind: str) -> int:
    return recipe_versions()[kind]


def result_keys(section: str) -> list[str]:
    """The keys of a schema section (`dataset`, `train`, `arch`, `probe`, `benchmark`, `report`) that change results."""
    schema = load_schema()
    props = schema["properties"]["report"] if section == "report" else schema["$defs"][section]
    not_result = NOT_RESULT_KEYS.get(section, frozenset()) | (
        frozenset(ARCH_NON_TRAJECTORY_KEYS) if section == "arch" else frozenset()
    )
    return [k for k in props["properties"] if k not in not_result]


def param_value(params: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted key; a key params does not spell out is a ParamsError naming the fix."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params: {key} is not set (run `xtra profile --fill` to write every schema key)")
        node = node[part]
    return node


def _pretrain_keys(params: Mapping[str, Any], model: str) -> list[str]:
    """A trained model: its trajectory, length and world size, and its online probes (`online_probe` and
    their kinds' settings: they shape the stage's metrics, not the model; `xtra.train.identity`); a random
    or pixels model: its architecture and the seed; a converted one (official, backbone): also its source
    and how it is read."""
    section, where = params["models"][model], f"models.{model}"
    keys = ["seed", f"{where}.init"] + [f"{where}.arch.{k}" for k in result_keys("arch")]
    if section["init"] == "pretrain":
        train = TRAIN_TRAJECTORY_KEYS + RUN_LENGTH_KEYS + WORLD_SIZE_KEYS
        keys += [f"{where}.dataset"] + [f"{where}.train.{k}" for k in train]
        # the online heads change metrics.json's `online` (this stage's metric), never model.pt
        kinds = [f"probe.kinds.{k}" for k in section["online_probe"]["kinds"] if k in params["probe"]["kinds"]]
        keys += [f"{where}.online_probe"] + kinds
    elif section["init"] == "official":
        keys += [f"{where}.checkpoint", f"{where}.drop_prefixes"]
    elif section["init"] == "backbone":
        keys += [f"{where}.checkpoint", f"{where}.backbone"]
    return keys


def stage_keys(
    params: Mapping[str, Any],
    kind: str,
    *,
    dataset: str | None = None,
    model: str | None = None,
    benchmark: str | None = None,
    kinds: Sequence[str] = (),
) -> list[str]:
    """The dotted params keys the result of one stage depends on (what its DAG entry lists).

    prepare: `dataset`; pretrain: `model`; probe: `model`, `benchmark` and the probe `kinds` it trains;
    report: nothing."""
    if kind == "prepare":
        return [f"datasets.{dataset}.{k}" for k in result_keys("dataset")]
    if kind == "pretrain":
        return _pretrain_keys(params, str(model))
    if kind == "probe":
        return (
            ["seed", f"models.{model}.arch", f"models.{model}.eval_resize"]
            + [f"probe.{k}" for k in result_keys("probe")]
            + [f"probe.kinds.{k}" for k in kinds if k in params["probe"]["kinds"]]
            + [f"probe.benchmarks.{benchmark}.{k}" for k in result_keys("benchmark")]
        )
    if kind == "report":
        return ["probe.protocol"] + [f"report.{k}" for k in result_keys("report")]
    raise ValueError(f"no stage kind {kind!r}; expected one of {STAGE_KINDS}")


def key_values(params: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {key: param_value(params, key) for key in keys}


def params_identity(params: Mapping[str, Any], kind: str, keys: Iterable[str]) -> str:
    """sha256 of a stage's recipe version and the values of its keys (Snakemake's `params: identity`)."""
    return params_hash({"recipe": recipe_version(kind), "params": key_values(params, keys)})


def stage_identity(kind: str, values: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """The identity of a stage's result: sha256 of its kind, recipe version, key values and input identities."""
    return params_hash({"stage": kind, "recipe": recipe_version(kind), "params": dict(values), "inputs": dict(inputs)})


def dataset_identity(manifest: Mapping[str, Any]) -> str:
    """A prepared dataset's identity: its content, every shard's sha256 (by split) and the classes.

    A re-preparation that writes the same bytes (other worker counts, a moved raw folder) is the
    same dataset; one that changes a single sample is another."""
    splits = {
        split: [[shard["file"], shard["sha256"]] for shard in entry["shards"]]
        for split, entry in sorted(manifest["splits"].items())
    }
    return params_hash({"classes": list(manifest["classes"]), "splits": splits})


def model_identity(run_id: str, steps: int, segments: Sequence[Mapping[str, Any]]) -> str:
    """A pre-trained model's identity: its run (trajectory, data, world size, seed, recipe), the steps
    taken and the schedule segments they were taken under (a run extended from 100 to 800 epochs
    differs from one scheduled for 800 from the start)."""
    return params_hash({"run": run_id, "steps": int(steps), "segments": [dict(s) for s in segments]})
