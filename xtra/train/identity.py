"""Which run a set of params is: the keys that change the optimisation trajectory, and nothing else.

A run is identified by the hash of `trajectory(params, model, world_size, data)` (the key table is
`xtra.identity`'s):
- `arch`: every key except `attn_impl` (the same mask computed by another kernel);
- `train`: `TRAIN_TRAJECTORY_KEYS` (batch_size, accumulate_grad_batches, lr, warmup_start_lr, min_lr,
  warmup_epochs, weight_decay, betas, grad_clip, precision, loader);
- the world size resolved by the trainer (devices x num_nodes, however `devices` is spelled);
- the training data by identity (`xtra.identity.dataset_identity`: every shard's sha256 and the
  classes, from the prepared manifest), not the dataset's params, so a re-preparation that gives the
  same bytes is the same run;
- `seed`, and the pretrain recipe version (`xtra/recipes.yaml`): a new version is a new run.
Not in it: `epochs` and `max_steps` (extending them continues the run; each schedule segment is
recorded in the checkpoints and the model's identity, `xtra.identity.model_identity`), `num_workers`
(the loaders' order does not depend on it, `xtra.data.streaming`; a run resumes exactly under another
count), `checkpoint_every_n_steps`, `keep_*`, `log_every_n_steps`, `val_*`, `reconstruct_images`,
`resources` (`threads` too: each segment's is recorded, `xtra.environment`), `accelerator`, `strategy`,
`eval_resize`.

The run's folder also holds the online probe heads (`models.<m>.online_probe`, when on) in every
checkpoint, so the folder id is `run_id(run_values(...))`: the trajectory plus the heads' settings and
their labelled set's identity. They never change a weight of the model (a test compares both bit for
bit), so the model's identity (`xtra.identity.model_identity`) is keyed on the trajectory alone,
`run_id(trajectory(...))`: turning the online probes on or off trains in another folder but gives a
model of the same identity, and every probe result of that model stays valid.

Each run has a folder of its own, `models/<m>/checkpoints/<run id>/`: a changed trajectory starts a
new folder beside the old one and never deletes or moves it; going back to earlier params resumes
(or finds finished) the earlier run. The run id is computed by every rank from its own params, so
no rank waits for another to rename anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xtra.config import params_hash
from xtra.errors import DataError
from xtra.identity import (
    ARCH_NON_TRAJECTORY_KEYS,
    TRAIN_TRAJECTORY_KEYS,
    dataset_identity,
    recipe_version,
)

__all__ = ["trajectory", "run_values", "run_id", "changed_keys", "data_identity"]


def data_identity(prepared_root: Path) -> str:
    """The identity of the prepared dataset at `prepared_root`, read from its manifest."""
    from xtra.data.prepared import load_manifest

    try:
        return dataset_identity(load_manifest(prepared_root))
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{Path(prepared_root) / 'manifest.json'}: cannot read the shards' checksums ({exc}); "
            f"run `xtra prepare {Path(prepared_root).name}`"
        ) from exc


def trajectory(params: dict[str, Any], name: str, world_size: int, data: str) -> dict[str, Any]:
    """The values that define model `name`'s run (see the module doc)."""
    model = params["models"][name]
    return {
        "arch": {k: v for k, v in sorted(model["arch"].items()) if k not in ARCH_NON_TRAJECTORY_KEYS},
        "train": {k: model["train"][k] for k in TRAIN_TRAJECTORY_KEYS},
        "world_size": int(world_size),
        "data": data,
        "seed": params["seed"],
        "recipe": recipe_version("pretrain"),
    }


def run_values(trajectory: dict[str, Any], online: dict[str, Any] | None) -> dict[str, Any]:
    """What the run's folder id hashes: the trajectory and, with online probes on, their settings
    (`OnlineProbeConfig.identity`, with the identity of the labelled set they train on); without them
    the trajectory alone, so a run without online probes keeps its id."""
    return trajectory if online is None else {**trajectory, "online_probe": online}


def run_id(values: dict[str, Any]) -> str:
    """The run's folder name: 16 hex digits of the trajectory's hash."""
    return params_hash(values)[:16]


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): values}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every trajectory key that differs (for messages)."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
