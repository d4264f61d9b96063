"""The typed config of the pretrain stage: what `xtra pretrain MODEL` reads from params, built once.

`PretrainConfig.from_params(params, model)` takes the validated params dict (every default filled
in by the schema, the one home of defaults and enums) and holds the model's settings, its `train`
section as a `TrainConfig` (one field per schema key; a test checks both ways) and the paths of the
stage. The `arch` section stays the params mapping: it is written into checkpoints and `model.pt`
as plain data, and `ArchConfig.from_dict` resolves it where the model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xtra.errors import ParamsError

__all__ = ["TrainConfig", "OnlineProbeConfig", "PretrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """A model's `train` section (`$defs/train` of the schema, whose descriptions say what each does)."""

    epochs: int
    max_steps: int
    batch_size: int  # per device
    accumulate_grad_batches: int
    lr: float
    warmup_start_lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    precision: str
    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    num_workers: int
    loader: str
    checkpoint_every_n_steps: int
    keep_last_checkpoints: int
    keep_every_n_steps: int
    log_every_n_steps: int
    val_every_n_steps: int
    val_split: str
    val_batches: int
    reconstruct_images: int

    @classmethod
    def from_dict(cls, train: Mapping[str, Any]) -> TrainConfig:
        """From a validated `train` section (every key present)."""
        return cls(**{**train, "betas": tuple(train["betas"])})

    def as_dict(self) -> dict[str, Any]:
        """The section as plain data (what a checkpoint's `hyper_parameters` hold)."""
        return {**asdict(self), "betas": list(self.betas)}


@dataclass(frozen=True)
class OnlineProbeConfig:
    """A model's `online_probe` section (`$defs/online_probe`), resolved: the split it is evaluated on,
    the folder of the labelled set, and each kind's own settings (the offline probe's `probe.kinds.<kind>`)."""

    kinds: tuple[str, ...]  # empty: off
    lrs: tuple[float, ...]
    weight_decay: float
    dataset: str | None  # None: the pre-training set
    eval_split: str
    eval_batches: int | None  # None: the whole split
    prepared: Path  # the labelled set's prepared folder (the pre-training set's when dataset is None)
    options: dict[str, dict[str, Any]]  # kind -> its own settings (e.g. num_last_blocks)

    @property
    def on(self) -> bool:
        return bool(self.kinds)

    def identity(self) -> dict[str, Any]:
        """What the run id holds of it (`xtra.train.identity`): every setting that changes the heads."""
        return {
            "kinds": list(self.kinds),
            "lrs": list(self.lrs),
            "weight_decay": self.weight_decay,
            "dataset": self.dataset,
            "options": {k: dict(sorted(v.items())) for k, v in sorted(self.options.items())},
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], model: str) -> OnlineProbeConfig:
        from xtra.probe.config import SWEEP_KEYS, kind_settings  # the probe kinds' settings (imports torch)

        section, where = params["models"][model], f"models.{model}.online_probe"
        online = section["online_probe"]
        dataset = online["dataset"]
        if dataset is not None and dataset not in params["datasets"]:
            raise ParamsError(f"{where}.dataset: {dataset!r} is not a dataset of this params file")
        kinds = params["probe"]["kinds"]
        options = {
            kind: {k: v for k, v in kind_settings(kind, kinds.get(kind)).items() if k not in SWEEP_KEYS}
            for kind in online["kinds"]
        }
        return cls(
            kinds=tuple(online["kinds"]),
            lrs=tuple(float(lr) for lr in online["lrs"]),
            weight_decay=float(online["weight_decay"]),
            dataset=dataset,
            eval_split=online["eval_split"] or section["train"]["val_split"],
            eval_batches=online["eval_batches"],
            prepared=Path(params["paths"]["prepared"]) / str(dataset or section["dataset"]),
            options=options,
        )


@dataclass(frozen=True)
class PretrainConfig:
    """One model's pretrain stage: its init, data, architecture section, recipe and folders."""

    model: str
    init: str  # pretrain | random | official | pixels | backbone
    dataset: str | None
    checkpoint: str | None  # init official: the release file to convert; init backbone: its weights file
    drop_prefixes: tuple[str, ...]  # init official: release key prefixes dropped by name
    backbone: dict[str, Any] | None  # init backbone: {name, args} (xtra.release.backbones)
    eval_resize: int
    arch: dict[str, Any]  # the params section (plain data)
    train: TrainConfig
    online_probe: OnlineProbeConfig
    seed: int
    prepared: Path  # the prepared dataset's folder (paths.prepared / dataset)
    out: Path  # the model's folder (paths.models / model)
    threads: int | None = None  # resources.threads: torch threads of each rank (no result's identity)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], model: str) -> PretrainConfig:
        """From validated params; an unknown model is a ParamsError naming the known ones."""
        if model not in params["models"]:
            raise ParamsError(f"models.{model}: no such model; known: {sorted(params['models'])}")
        section = params["models"][model]
        return cls(
            model=model,
            init=section["init"],
            dataset=section["dataset"],
            checkpoint=section["checkpoint"],
            drop_prefixes=tuple(section["drop_prefixes"]),
            backbone=section["backbone"],
            eval_resize=section["eval_resize"],
            arch=dict(section["arch"]),
            train=TrainConfig.from_dict(section["train"]),
            online_probe=OnlineProbeConfig.from_params(params, model),
            seed=params["seed"],
            prepared=Path(params["paths"]["prepared"]) / str(section["dataset"]),
            out=Path(params["paths"]["models"]) / model,
            threads=section["resources"]["threads"],
        )
