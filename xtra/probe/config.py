"""One typed object per probe job: everything a (model, benchmark) job reads from params.

`probe_config(params, model, benchmark, kinds)` resolves the benchmark's settings, the probe section,
each kind's settings (`probe.kinds.<kind>`) and the model's evaluation resize and folders into a
frozen `ProbeConfig` holding one `SweepConfig` per kind (the training loop's view). The job, the
loop and the state read this object only, never the raw params.

The release's recipe (docs/probing.md, "Probe settings") is the default: AdamW betas (0.9, 0.95),
the schedule the release actually runs (`schedule: release`,
`xtra.train.schedule.release_warmup_cosine`), a short last accumulation group's loss divided by the
accumulation count (`last_group_loss: release`), augmentation per kind
(`probe.kinds.<kind>.augmentation`). The defaults of a `SweepConfig` are the schema's (a test
checks them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xtra.config import schema_section
from xtra.data.transforms import AUGMENTATIONS
from xtra.errors import ParamsError
from xtra.model.probes import PROBE_KINDS, model_kinds, probe_kind

__all__ = ["SweepConfig", "ProbeConfig", "probe_config", "settings_grid", "kind_settings"]

# the settings every kind has (they make the sweep grid and the transform); the rest are the kind's own
SWEEP_KEYS = ("weight_decays", "augmentation")


def settings_grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """Every (lr, weight_decay) pair, weight decay major (lrs vary fastest)."""
    return tuple((float(lr), float(wd)) for wd in weight_decays for lr in lrs)


def kind_settings(kind: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A kind's settings: `given` over the schema's defaults (`probe.kinds.<kind>`, else `$defs/probe_kind`)."""
    kinds = schema_section("probe")["properties"]["kinds"]["properties"]
    props = kinds[kind]["properties"] if kind in kinds else schema_section("probe_kind")["properties"]
    defaults = {
        k: v["default"] if "default" in v else schema_section(v["$ref"].rsplit("/", 1)[1]).get("default")
        for k, v in props.items()
    }
    return {**defaults, **(given or {})}


@dataclass(frozen=True)
class SweepConfig:
    """Everything the training loop of one kind's head bank depends on."""

    kind: str
    settings: tuple[tuple[float, float], ...]  # (lr, weight_decay) of each head
    epochs: int
    warmup_epochs: float = 0.0
    accum_steps: int = 1
    grad_clip: float = 3.0
    min_lr: float = 1e-5
    warmup_start_factor: float = 0.1
    seed: int = 0
    precision: str = "32-true"
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "release"  # release | nominal
    last_group_loss: str = "release"  # release: / accum_steps; exact: / the group's real length
    augmentation: str = "none"  # the training transform (none: probe.augment is off)
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own settings (e.g. num_last_blocks)

    def __post_init__(self) -> None:
        if not self.settings:
            raise ParamsError("empty sweep grid: no (lr, weight_decay) setting to train (probe.benchmarks.*.lrs)")
        if self.epochs < 1 or self.accum_steps < 1:
            raise ParamsError(f"epochs ({self.epochs}) and accum_steps ({self.accum_steps}) must be >= 1")
        if self.schedule not in ("release", "nominal"):
            raise ParamsError(f"probe.schedule: {self.schedule!r}; expected release or nominal")
        if self.augmentation not in AUGMENTATIONS:
            raise ParamsError(
                f"probe.kinds.{self.kind}.augmentation: {self.augmentation!r}; expected one of {AUGMENTATIONS}"
            )
        own = {k: v for k, v in kind_settings(self.kind, self.options).items() if k not in SWEEP_KEYS}
        object.__setattr__(self, "options", own)  # the schema's defaults under what was given

    @property
    def blocks(self) -> list[int]:
        """The encoder blocks this kind reads (negative: from the end)."""
        return probe_kind(self.kind).blocks(self.options)


@dataclass(frozen=True)
class ProbeConfig:
    """One (model, benchmark) probe job: data, protocol, devices, its folders, and one SweepConfig per kind."""

    model: str
    benchmark: str
    dataset: str
    train_split: str
    eval_split: str
    batch_size: int
    eval_resize: int
    protocol: str
    heldout_fraction: float
    num_workers: int
    devices: int
    seed: int
    augment: bool
    arch: dict  # the model's arch section (the model file must have it)
    model_dir: Path  # paths.models / model: model.pt, metrics.json
    prepared: Path  # paths.prepared / dataset
    results: Path  # paths.results: results/probe/<model>/, the resumable state in results/probe-state/
    sweeps: tuple[SweepConfig, ...] = field(default_factory=tuple)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.sweeps)

    def sweep(self, kind: str) -> SweepConfig:
        return next(s for s in self.sweeps if s.kind == kind)

    def transform_groups(self) -> dict[str, tuple[SweepConfig, ...]]:
        """Kinds sharing a training transform (one encoder pass feeds them all), by augmentation."""
        groups: dict[str, list[SweepConfig]] = {}
        for s in self.sweeps:
            groups.setdefault(s.augmentation, []).append(s)
        return {aug: tuple(group) for aug, group in groups.items()}

    def as_dict(self) -> dict:
        return asdict(self)


def _sweep(params: dict, bench_name: str, kind: str) -> SweepConfig:
    probe, bench = params["probe"], params["probe"]["benchmarks"][bench_name]
    if not bench.get("lrs"):
        raise ParamsError(f"probe.benchmarks.{bench_name}.lrs: empty sweep grid (no learning rate to train)")
    own = kind_settings(kind, probe["kinds"].get(kind))
    if not own["weight_decays"]:
        raise ParamsError(f"probe.kinds.{kind}.weight_decays: empty sweep grid (no weight decay)")
    return SweepConfig(
        kind=kind,
        settings=settings_grid(bench["lrs"], own["weight_decays"]),
        epochs=bench["epochs"],
        warmup_epochs=bench["warmup_epochs"],
        accum_steps=bench["accum_steps"],
        grad_clip=probe["grad_clip"],
        min_lr=probe["min_lr"],
        warmup_start_factor=probe["warmup_start_factor"],
        seed=params["seed"],
        precision=probe["precision"],
        betas=tuple(probe["betas"]),
        schedule=probe["schedule"],
        last_group_loss=probe["last_group_loss"],
        augmentation=own["augmentation"] if probe["augment"] else "none",
        options={k: v for k, v in own.items() if k not in SWEEP_KEYS},
    )


def probe_config(params: dict, model: str, benchmark: str, kinds: Sequence[str] | None = None) -> ProbeConfig:
    """The typed config of job (model, benchmark) for `kinds` (default: the benchmark's, filtered by model)."""
    if benchmark not in params["probe"]["benchmarks"]:
        raise ParamsError(
            f"probe.benchmarks has no benchmark {benchmark!r}; known: {sorted(params['probe']['benchmarks'])}"
        )
    probe, bench = params["probe"], params["probe"]["benchmarks"][benchmark]
    kinds = tuple(kinds or model_kinds(params["models"][model]["init"], bench["kinds"]))
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if bad:
        raise ParamsError(f"unknown probe kind {bad}; expected some of {PROBE_KINDS.names()}")
    return ProbeConfig(
        model=model,
        benchmark=benchmark,
        dataset=bench["dataset"],
        train_split=bench["train_split"],
        eval_split=bench["eval_split"],
        batch_size=bench["batch_size"],
        eval_resize=params["models"][model]["eval_resize"],
        protocol=probe["protocol"],
        heldout_fraction=probe["heldout_fraction"],
        num_workers=probe["num_workers"],
        devices=bench["devices"],
        seed=params["seed"],
        augment=probe["augment"],
        arch=dict(params["models"][model]["arch"]),
        model_dir=Path(params["paths"]["models"]) / model,
        prepared=Path(params["paths"]["prepared"]) / bench["dataset"],
        results=Path(params["paths"]["results"]),
        sweeps=tuple(_sweep(params, benchmark, k) for k in kinds),
    )
