"""One probe job: (model, benchmark, kind) -> the result dict of `results/probe/<model>/<benchmark>-<kind>.json`.

`plan_jobs` turns the command line into jobs (unknown benchmark or kind: ParamsError), `preflight`
checks every job's inputs before any training starts (checkpoint architecture, prepared dataset and
splits, sweep grid, probe shape), `run_job` trains the sweep and evaluates it (see `probe_train`),
`write_result` writes the JSON atomically.

Selection protocols (METHOD.md): `paper` trains on the whole train split and selects the head with
the best top-1 on the evaluation split; `heldout` trains on the train split minus a stratified
held-out part (`probe.heldout_fraction`), selects on that part and reports the selected head's
accuracy on the evaluation split.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from xtra.atomic import write_json_atomic
from xtra.errors import DataError, ParamsError
from xtra.model.probes import PROBE_KINDS, HeadBank
from xtra.probe.loop import (
    CachedFeatures, FeatureSource, HeadScores, LiveFeatures, SweepConfig, cache_features, encoded_batches,
    evaluate_bank, settings_grid, train_bank,
)

__all__ = ["ProbeJob", "plan_jobs", "preflight", "sweep_config", "run_job", "write_result", "result_path",
           "stratified_split", "checkpoint_path", "CACHE_LIMIT_ENV"]

CACHE_LIMIT_ENV = "XTRA_PROBE_CACHE_GB"  # largest training-feature cache (GiB) before recomputing per batch
DEFAULT_CACHE_GB = 4.0


@dataclass(frozen=True)
class ProbeJob:
    model: str
    benchmark: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.benchmark}-{self.kind}"


def checkpoint_path(params: dict, model: str) -> Path:
    return Path(params["paths"]["models"]) / model / "last.ckpt"


def result_path(params: dict, job: ProbeJob) -> Path:
    return Path(params["paths"]["results"]) / "probe" / job.model / f"{job.name}.json"


def plan_jobs(params: dict, model: str, benchmarks: Optional[Sequence[str]] = None,
              kinds: Optional[Sequence[str]] = None, source: str = "params.yaml") -> list[ProbeJob]:
    """The (benchmark x kind) jobs of a model; names not in params are a ParamsError naming the key."""
    if model not in params["models"]:
        raise ParamsError(f"{source}: models.{model}: no such model; known: {sorted(params['models'])}")
    configured = params["probe"]["benchmarks"]
    unknown = [b for b in benchmarks or [] if b not in configured]
    if unknown:
        raise ParamsError(f"{source}: probe.benchmarks has no benchmark {unknown}; known: {sorted(configured)}")
    bad_kinds = [k for k in kinds or [] if k not in PROBE_KINDS]
    if bad_kinds:
        raise ParamsError(f"unknown probe kind {bad_kinds}; expected some of {list(PROBE_KINDS)}")
    jobs = []
    for bench in benchmarks or list(configured):
        allowed = configured[bench]["kinds"]
        missing = [k for k in kinds or [] if k not in allowed]
        if missing and benchmarks:  # a benchmark named on the command line must have every kind asked for
            raise ParamsError(f"{source}: probe.benchmarks.{bench}.kinds is {allowed}; it has no {missing}")
        jobs.extend(ProbeJob(model, bench, k) for k in allowed if not kinds or k in kinds)
    if not jobs:
        raise ParamsError(f"{source}: no benchmark of probe.benchmarks has the probe kind(s) {list(kinds or [])}")
    return list(dict.fromkeys(jobs))


def sweep_config(params: dict, job: ProbeJob, depth: Optional[int] = None) -> SweepConfig:
    """The SweepConfig of a job from params (probe section and its benchmark)."""
    probe, bench = params["probe"], params["probe"]["benchmarks"][job.benchmark]
    where = f"probe.benchmarks.{job.benchmark}.lrs"
    if not bench.get("lrs"):
        raise ParamsError(f"{where}: empty sweep grid (no learning rate to train)")
    decays = probe["linear_weight_decays"] if job.kind == "linear" else probe["attentive_weight_decays"]
    if not decays:
        raise ParamsError(f"probe.{job.kind}_weight_decays: empty sweep grid (no weight decay)")
    if job.kind == "attentive" and depth is not None and probe["num_last_blocks"] > depth:
        raise ParamsError(f"probe.num_last_blocks: {probe['num_last_blocks']} blocks asked, "
                          f"model {job.model} has {depth}")
    return SweepConfig(
        kind=job.kind, settings=settings_grid(bench["lrs"], decays), epochs=bench["epochs"],
        warmup_epochs=bench["warmup_epochs"], accum_steps=bench["accum_steps"], grad_clip=probe["grad_clip"],
        min_lr=probe["min_lr"], warmup_start_factor=probe["warmup_start_factor"],
        num_last_blocks=probe["num_last_blocks"], attn_heads=probe["attn_heads"], seed=params["seed"],
        precision=probe["precision"],
    )


def _dataset_root(params: dict, job: ProbeJob) -> Path:
    return Path(params["paths"]["prepared"]) / params["probe"]["benchmarks"][job.benchmark]["dataset"]


def _check_data(params: dict, job: ProbeJob) -> None:
    from xtra.data.loaders import load_manifest

    bench = params["probe"]["benchmarks"][job.benchmark]
    root = _dataset_root(params, job)
    try:
        manifest = load_manifest(root)
    except DataError as exc:
        raise DataError(f"benchmark {job.benchmark!r}: dataset {bench['dataset']!r} was never prepared "
                        f"({exc})") from exc
    for key in ("train_split", "eval_split"):
        if bench[key] not in manifest["splits"]:
            raise DataError(f"probe.benchmarks.{job.benchmark}.{key}: dataset {bench['dataset']!r} ({root}) has "
                            f"no split {bench[key]!r}; its splits: {sorted(manifest['splits'])}")
    if manifest["splits"][bench["train_split"]]["count"] < 2:
        raise DataError(f"benchmark {job.benchmark!r}: split {bench['train_split']!r} of {root} has fewer "
                        "than 2 samples")


def preflight(params: dict, model: str, jobs: Sequence[ProbeJob]) -> None:
    """Every check that needs no training, for all jobs, before any of them starts."""
    from xtra.model.checkpoint import load_encoder

    encoder, _ = load_encoder(checkpoint_path(params, model), params["models"][model]["arch"])
    for job in jobs:
        cfg = sweep_config(params, job, depth=len(encoder.blocks))
        if job.kind == "attentive" and encoder.width % cfg.attn_heads != 0:
            raise ParamsError(f"probe.attn_heads: {cfg.attn_heads} heads do not divide the width "
                              f"{encoder.width} of model {model}")
        _check_data(params, job)
    del encoder


def _quotas(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per-class held-out counts summing to round(fraction * n) (largest remainders; >= 1 kept per class)."""
    exact = fraction * counts
    quota = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    short = int(round(fraction * counts.sum())) - int(quota.sum())
    order = np.lexsort((rng.random(len(counts)), -(exact - np.floor(exact))))  # largest remainder first
    for c in order:
        if short <= 0:
            break
        if quota[c] < counts[c] - 1:
            quota[c] += 1
            short -= 1
    return quota


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices: about `fraction` of each class held out, round(fraction * n) in all."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _quotas(counts, fraction, rng)
    held = [rng.permutation(np.flatnonzero(labels == cls))[:q] for cls, q in zip(classes, quota)]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    if len(held_idx) == 0:
        raise DataError(f"probe.heldout_fraction {fraction}: holds out no sample of {len(labels)}")
    return kept_idx, held_idx


def write_result(params: dict, job: ProbeJob, result: dict) -> Path:
    return write_json_atomic(result_path(params, job), result, indent=1)


@dataclass
class _JobData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    heldout: Optional[torch.utils.data.Dataset]
    num_classes: int
    manifest_sha256: str


def _build_data(params: dict, job: ProbeJob, img_size: int, eval_resize: int) -> _JobData:
    from xtra.data.loaders import PreparedDataset
    from xtra.data.transforms import eval_transform, probe_train_transform

    probe, bench = params["probe"], params["probe"]["benchmarks"][job.benchmark]
    root = _dataset_root(params, job)
    eval_tf = eval_transform(img_size, eval_resize)
    train_tf = probe_train_transform(img_size) if probe["augment"] else eval_tf
    train = PreparedDataset(root, bench["train_split"], train_tf)
    evaluation = PreparedDataset(root, bench["eval_split"], eval_tf)
    heldout = None
    if probe["protocol"] == "heldout":
        kept, held = stratified_split(np.asarray(train.targets), probe["heldout_fraction"], params["seed"])
        heldout = Subset(PreparedDataset(root, bench["train_split"], eval_tf), held.tolist())
        train = Subset(train, kept.tolist())
    return _JobData(train, evaluation, heldout, evaluation.num_classes, evaluation.manifest_sha256)


def _loader(params: dict, job: ProbeJob, ds: torch.utils.data.Dataset, shuffle: bool,
            drop_last: bool = False) -> torch.utils.data.DataLoader:
    from xtra.data.loaders import make_loader

    bench = params["probe"]["benchmarks"][job.benchmark]
    return make_loader(ds, bench["batch_size"], num_workers=params["probe"]["num_workers"], shuffle=shuffle,
                       seed=params["seed"], rank=0, world_size=1, drop_last=drop_last)


def _cache_limit_bytes() -> float:
    return float(os.environ.get(CACHE_LIMIT_ENV, DEFAULT_CACHE_GB)) * 2**30


def _train_source(params: dict, job: ProbeJob, encoder: torch.nn.Module, train: torch.utils.data.Dataset,
                  cfg: SweepConfig, device: torch.device) -> tuple[FeatureSource, str]:
    """Cached features when the batches are the same every epoch (no augmentation) and they fit."""
    batch_size = params["probe"]["benchmarks"][job.benchmark]["batch_size"]
    drop_last = len(train) >= batch_size
    per_sample = encoder.width * (1 if job.kind == "linear" else encoder.grid**2) * 4  # float32 bytes
    if not params["probe"]["augment"] and len(train) * per_sample <= _cache_limit_bytes():
        feats, labels = cache_features(encoder, _loader(params, job, train, shuffle=False), cfg, device)
        return CachedFeatures(feats, labels, batch_size, seed=cfg.seed, drop_last=drop_last, device=device), "cached"
    loader = _loader(params, job, train, shuffle=True, drop_last=drop_last)
    return LiveFeatures(encoder, loader, cfg, device), "recomputed"


def _best(values: Sequence[float]) -> int:
    """Index of the highest value (the first of ties: the smallest lr of the lowest weight decay)."""
    return int(max(range(len(values)), key=lambda i: (values[i], -i)))


def _images_seen(params: dict, model: str) -> Optional[int]:
    path = Path(params["paths"]["models"]) / model / "metrics.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("images_seen")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read images_seen: {exc}") from exc
    return int(value) if isinstance(value, (int, float)) else None


def _selection(settings: Sequence[tuple[float, float]], i: int, scores: HeadScores) -> dict:
    lr, wd = settings[i]
    return {"selected": {"lr": lr, "weight_decay": wd}, "top1": scores.top1[i], "top5": scores.top5[i]}


def _select(params: dict, job: ProbeJob, bank: HeadBank, encoder: torch.nn.Module, data: _JobData,
            cfg: SweepConfig, device: torch.device) -> dict:
    """Every head's accuracy, and the selection of the params' protocol (and the held-out one when run)."""
    def scores_on(ds: torch.utils.data.Dataset) -> HeadScores:
        batches = encoded_batches(encoder, _loader(params, job, ds, shuffle=False), cfg, device)
        return evaluate_bank(bank, batches, data.num_classes, device, cfg.precision)

    scores = scores_on(data.eval)
    heads = [{"lr": lr, "weight_decay": wd, "top1": scores.top1[i], "top5": scores.top5[i], "heldout_top1": None}
             for i, (lr, wd) in enumerate(cfg.settings)]
    paper, heldout = _selection(cfg.settings, _best(scores.top1), scores), None
    if data.heldout is not None:
        held = scores_on(data.heldout)
        for head, value in zip(heads, held.top1):
            head["heldout_top1"] = value
        heldout = {**_selection(cfg.settings, _best(held.top1), scores), "heldout_top1": max(held.top1),
                   "fraction": params["probe"]["heldout_fraction"], "num_heldout": held.count}
    chosen = heldout if params["probe"]["protocol"] == "heldout" else paper
    return {"protocol": params["probe"]["protocol"], **chosen, "heads": heads, "heldout": heldout,
            "num_eval": scores.count}


def run_job(params: dict, job: ProbeJob, device: Optional[torch.device] = None,
            log: Callable[[str], None] = print) -> dict:
    """Train and evaluate one job's sweep; returns the probe-result dict (ARCHITECTURE.md)."""
    from xtra.model.checkpoint import file_sha256, load_encoder

    start = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg, probe = params["models"][job.model], params["probe"]
    ckpt = checkpoint_path(params, job.model)
    encoder, arch = load_encoder(ckpt, model_cfg["arch"])  # frozen, eval mode, block-causal mask kept
    encoder.to(device)
    cfg = sweep_config(params, job, depth=len(encoder.blocks))
    data = _build_data(params, job, arch.img_size, model_cfg["eval_resize"])
    source, features = _train_source(params, job, encoder, data.train, cfg, device)
    log(f"[{job.model}/{job.name}] {len(cfg.settings)} heads, {len(data.train)} train images, "
        f"features {features}, {cfg.epochs} epochs on {device}")
    bank = HeadBank(job.kind, encoder.width, data.num_classes, cfg.settings, cfg.attn_heads, cfg.seed)
    train_bank(bank, source, cfg, device)
    del source
    selection = _select(params, job, bank, encoder, data, cfg, device)
    bench = probe["benchmarks"][job.benchmark]
    return {
        "model": job.model, "benchmark": job.benchmark, "kind": job.kind, **selection,
        "epochs": cfg.epochs, "seed": cfg.seed, "checkpoint_sha256": file_sha256(ckpt),
        "manifest_sha256": data.manifest_sha256, "wall_time_s": round(time.perf_counter() - start, 3),
        "train_split": bench["train_split"], "eval_split": bench["eval_split"], "num_train": len(data.train),
        "num_classes": data.num_classes, "images_seen_pretrain": _images_seen(params, job.model),
        "dataset": bench["dataset"], "features": features, "augment": probe["augment"],
        "batch_size": bench["batch_size"], "accum_steps": cfg.accum_steps, "warmup_epochs": cfg.warmup_epochs,
        "grad_clip": cfg.grad_clip, "precision": cfg.precision, "device": str(device),
    }
