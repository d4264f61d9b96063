"""Which run a set of params is: the keys that change the optimisation trajectory, and nothing else.

A run is identified by the hash of `trajectory(params, model, world_size)`:
- `arch`: every key except `attn_impl` (the same mask computed by another kernel);
- `train`: batch_size, accumulate_grad_batches, lr, warmup_start_lr, min_lr, warmup_epochs,
  weight_decay, betas, grad_clip, precision, loader; with `loader: stream` also num_workers (the
  stream's order depends on how many workers split each rank's share);
- the world size resolved by the trainer (devices x num_nodes, however `devices` is spelled);
- the training data by content: the sha256 of every shard of the train split (from the prepared
  manifest), not the dataset's params, so a re-preparation that gives the same bytes is the same run;
- `seed`.
Not in it: `epochs` and `max_steps` (extending them continues the run, see `schedule_steps`), the
datasets' `num_workers` (and the train loader's with `loader: random`), `checkpoint_every_n_steps`, `keep_*`,
`log_every_n_steps`, `val_*`,
`reconstruct_images`, `resources`, `accelerator`, `strategy`, `eval_resize`.

Each run has a folder of its own, `models/<m>/checkpoints/<run id>/`: a changed trajectory starts a
new folder beside the old one and never deletes or moves it; going back to earlier params resumes
(or finds finished) the earlier run. The run id is computed by every rank from its own params, so
no rank waits for another to rename anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xtra.config import params_hash
from xtra.errors import DataError

__all__ = [
    "TRAIN_TRAJECTORY_KEYS",
    "ARCH_NON_TRAJECTORY_KEYS",
    "trajectory",
    "run_id",
    "changed_keys",
    "data_fingerprint",
]

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
ARCH_NON_TRAJECTORY_KEYS = ("attn_impl",)


def data_fingerprint(prepared_root: Path) -> str:
    """sha256 over the train split's shard checksums, read from the prepared manifest."""
    path = Path(prepared_root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["splits"]["train"]["shards"]
        return params_hash([[s["file"], s["sha256"]] for s in shards])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: cannot read the train split's shard checksums ({exc}); "
            f"run `xtra prepare {Path(prepared_root).name}`"
        ) from exc


def trajectory(params: dict[str, Any], name: str, world_size: int, data: str) -> dict[str, Any]:
    """The values that define model `name`'s run (see the module doc)."""
    model = params["models"][name]
    return {
        "arch": {k: v for k, v in sorted(model["arch"].items()) if k not in ARCH_NON_TRAJECTORY_KEYS},
        "train": {
            k: model["train"][k]
            for k in TRAIN_TRAJECTORY_KEYS + (("num_workers",) if model["train"]["loader"] == "stream" else ())
        },
        "world_size": int(world_size),
        "data": data,
        "seed": params["seed"],
    }


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
