"""One typed object per probe job: everything a (model, benchmark) job reads from params.

`probe_config(params, model, benchmark, kinds)` resolves the benchmark's settings, the probe section
and the model's evaluation resize into a frozen `ProbeConfig` holding one `SweepConfig` per kind (the
training loop's view). The job, the loop and the state read this object only, never the raw params.

The release's recipe (README, "Probe settings") is the default: AdamW betas (0.9, 0.95), the
schedule the release actually runs (`schedule: release`, `xtra.train.schedule.release_warmup_cosine`),
a short last accumulation group's loss divided by the accumulation count (`last_group_loss:
release`), augmentation per kind (`augmentation.linear` / `.attentive`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xtra.errors import ParamsError
from xtra.model.probes import PROBE_KINDS, model_kinds, probe_blocks

__all__ = ["SweepConfig", "ProbeConfig", "probe_config", "settings_grid", "AUGMENTATIONS"]

AUGMENTATIONS = ("none", "randaugment", "crop_flip")


def settings_grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """Every (lr, weight_decay) pair, weight decay major (lrs vary fastest)."""
    return tuple((float(lr), float(wd)) for wd in weight_decays for lr in lrs)


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
    num_last_blocks: int = 6
    attn_heads: int = 16
    seed: int = 0
    precision: str = "32-true"
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "release"  # release | nominal
    last_group_loss: str = "release"  # release: / accum_steps; exact: / the group's real length
    augmentation: str = "none"  # none | randaugment | crop_flip

    def __post_init__(self) -> None:
        if not self.settings:
            raise ParamsError("empty sweep grid: no (lr, weight_decay) setting to train (probe.benchmarks.*.lrs)")
        if self.epochs < 1 or self.accum_steps < 1:
            raise ParamsError(f"epochs ({self.epochs}) and accum_steps ({self.accum_steps}) must be >= 1")
        if self.schedule not in ("release", "nominal"):
            raise ParamsError(f"probe.schedule: {self.schedule!r}; expected release or nominal")
        if self.augmentation not in AUGMENTATIONS:
            raise ParamsError(f"probe.augmentation.{self.kind}: {self.augmentation!r}; expected one of {AUGMENTATIONS}")

    @property
    def blocks(self) -> list[int]:
        return probe_blocks(self.kind, self.num_last_blocks)


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
    decays = probe[f"{kind}_weight_decays"]
    if not decays:
        raise ParamsError(f"probe.{kind}_weight_decays: empty sweep grid (no weight decay)")
    augmentation = probe["augmentation"][kind] if probe["augment"] else "none"
    return SweepConfig(
        kind=kind,
        settings=settings_grid(bench["lrs"], decays),
        epochs=bench["epochs"],
        warmup_epochs=bench["warmup_epochs"],
        accum_steps=bench["accum_steps"],
        grad_clip=probe["grad_clip"],
        min_lr=probe["min_lr"],
        warmup_start_factor=probe["warmup_start_factor"],
        num_last_blocks=probe["num_last_blocks"],
        attn_heads=probe["attn_heads"],
        seed=params["seed"],
        precision=probe["precision"],
        betas=tuple(probe["betas"]),
        schedule=probe["schedule"],
        last_group_loss=probe["last_group_loss"],
        augmentation=augmentation,
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
        raise ParamsError(f"unknown probe kind {bad}; expected some of {list(PROBE_KINDS)}")
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
