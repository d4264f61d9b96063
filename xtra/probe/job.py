"""One probe job: (model, benchmark) -> one result dict per kind, `results/probe/<model>/<benchmark>-<kind>.json`.

Read top-down: `plan_jobs` turns the command line into jobs (unknown benchmark or kind:
ParamsError), `preflight` checks every job's inputs before any training starts (model file and
architecture, prepared dataset and splits, sweep grids, probe shapes), `run_job` runs a job on its
devices and `_run_rank` is the job on one of them: config -> encoder -> data -> banks -> epochs
(resumable) -> selection and results; `write_results` writes the JSONs atomically.

One job runs all the kinds of its benchmark: kinds with the same training transform share one
encoder forward per batch (`xtra.probe.loop`); a kind with its own transform gets its own pass in
the same epoch. The job saves its state after every epoch (`xtra.probe.state`) and continues from
it when re-run; it runs on `probe.benchmarks.<b>.devices` processes (`xtra.probe.dist`).

Identity (`job_identity`): the probe recipe version, the job's params keys
(`xtra.identity.stage_keys`), its kinds, the model's identity (model.pt's provenance) and the
dataset's (its manifest's content). Every result JSON records it, with the model's identity, and a
state is resumed only by a job of the same identity. A finished job's state keeps its results: a
re-run writes the same JSONs without training or evaluating. No timing is in a result (it would
change the bytes of a re-run); the job's log line says how long it took.

Selection protocols (METHOD.md): `paper` trains on the whole train split and selects the head with
the best top-1 on the evaluation split; `heldout` trains on the train split minus a stratified
held-out part (`probe.heldout_fraction`), selects on that part and reports the selected head's
accuracy on the evaluation split.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xtra.atomic import sha256_file, write_json_atomic
from xtra.data.prepared import load_manifest
from xtra.environment import add_segment, apply_threads, environment
from xtra.errors import DataError, ParamsError
from xtra.identity import dataset_identity, key_values, stage_identity, stage_keys
from xtra.model.artifact import ARTIFACT_NAME, artifact_identity
from xtra.model.checkpoint import load_artifact_encoder
from xtra.model.probes import PIXEL_FLOOR_INIT, PROBE_KINDS, HeadBank, model_kinds, probe_kind
from xtra.probe.config import ProbeConfig, probe_config
from xtra.probe.data import JobData, build_data, eval_loader, train_loader
from xtra.probe.dist import run_on_devices, world
from xtra.probe.loop import (
    BankTrainer,
    CachedFeatures,
    FeatureSource,
    HeadScores,
    LiveFeatures,
    cache_features,
    encoded_batches,
    evaluate_bank,
    train_banks,
)
from xtra.probe.state import finish_state, finished_results, load_state, log_progress, save_state, state_path

__all__ = [
    "ProbeJob",
    "JobHooks",
    "plan_jobs",
    "preflight",
    "job_identity",
    "run_job",
    "write_results",
    "result_path",
    "model_path",
    "job_threads",
    "CACHE_LIMIT_ENV",
    "InjectedFailure",
]

CACHE_LIMIT_ENV = "XTRA_PROBE_CACHE_GB"  # largest training-feature cache (GiB) before recomputing per batch
DEFAULT_CACHE_GB = 4.0


class InjectedFailure(RuntimeError):
    """Raised inside a job by a fault-injection hook (tests of the retry, resume and report paths)."""


@dataclass(frozen=True)
class ProbeJob:
    model: str
    benchmark: str
    kinds: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.benchmark

    def result_names(self) -> list[str]:
        return [f"{self.benchmark}-{k}" for k in self.kinds]


@dataclass(frozen=True)
class JobHooks:
    """Fault injection after a saved epoch (tests): SIGKILL this process, or raise InjectedFailure once."""

    kill_after_epoch: int | None = None
    fail_after_epoch: int | None = None


def model_path(params: dict, model: str) -> Path:
    return Path(params["paths"]["models"]) / model / ARTIFACT_NAME


def result_path(params: dict, model: str, benchmark: str, kind: str) -> Path:
    return Path(params["paths"]["results"]) / "probe" / model / f"{benchmark}-{kind}.json"


def plan_jobs(
    params: dict,
    model: str,
    benchmarks: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    source: str = "params.yaml",
) -> list[ProbeJob]:
    """The (benchmark) jobs of a model with their kinds; names not in params are a ParamsError naming the key."""
    if model not in params["models"]:
        raise ParamsError(f"{source}: models.{model}: no such model; known: {sorted(params['models'])}")
    configured = params["probe"]["benchmarks"]
    unknown = [b for b in benchmarks or [] if b not in configured]
    if unknown:
        raise ParamsError(f"{source}: probe.benchmarks has no benchmark {unknown}; known: {sorted(configured)}")
    bad_kinds = [k for k in kinds or [] if k not in PROBE_KINDS]
    if bad_kinds:
        raise ParamsError(f"unknown probe kind {bad_kinds}; expected some of {PROBE_KINDS.names()}")
    init = params["models"][model]["init"]
    jobs = []
    for bench in benchmarks or list(configured):
        allowed = model_kinds(init, configured[bench]["kinds"])
        missing = [k for k in kinds or [] if k not in allowed]
        if missing and benchmarks:  # a benchmark named on the command line must have every kind asked for
            why = (
                f"model {model} is the pixel floor (kinds {list(model_kinds(init, PROBE_KINDS.names()))} only)"
                if init == PIXEL_FLOOR_INIT
                else f"{source}: probe.benchmarks.{bench}.kinds is {configured[bench]['kinds']}"
            )
            raise ParamsError(f"{why}; benchmark {bench} has no {missing} for it")
        chosen = tuple(k for k in allowed if not kinds or k in kinds)
        if chosen:
            jobs.append(ProbeJob(model, bench, chosen))
    if not jobs:
        raise ParamsError(
            f"{source}: no benchmark of probe.benchmarks has the probe kind(s) {list(kinds or [])} for model {model}"
        )
    return jobs


def preflight(params: dict, model: str, jobs: Sequence[ProbeJob]) -> None:
    """Every check that needs no training, for all jobs, before any of them starts."""
    encoder, _, _ = load_artifact_encoder(model_path(params, model), params["models"][model]["arch"])
    for job in jobs:
        cfg = probe_config(params, model, job.benchmark, job.kinds)
        _check_shapes(cfg, encoder)
        _check_data(cfg)
    del encoder


def _check_data(cfg: ProbeConfig) -> None:
    root = cfg.prepared
    try:
        manifest = load_manifest(root)
    except DataError as exc:
        raise DataError(f"benchmark {cfg.benchmark!r}: dataset {cfg.dataset!r} was never prepared ({exc})") from exc
    for key, split in (("train_split", cfg.train_split), ("eval_split", cfg.eval_split)):
        if split not in manifest["splits"]:
            raise DataError(
                f"probe.benchmarks.{cfg.benchmark}.{key}: dataset {cfg.dataset!r} ({root}) has "
                f"no split {split!r}; its splits: {sorted(manifest['splits'])}"
            )
    if manifest["splits"][cfg.train_split]["count"] < 2:
        raise DataError(f"benchmark {cfg.benchmark!r}: split {cfg.train_split!r} of {root} has fewer than 2 samples")


def _check_shapes(cfg: ProbeConfig, encoder: torch.nn.Module) -> None:
    """Each kind's settings fit the encoder (e.g. the attentive kind's blocks and heads); the kind says why not."""
    for sweep in cfg.sweeps:
        problem = probe_kind(sweep.kind).check(sweep.options, encoder.width, len(encoder.blocks))
        if problem:
            raise ParamsError(f"{problem} (model {cfg.model})")


def job_identity(params: dict, job: ProbeJob) -> tuple[str, str]:
    """(the job's identity, its model's identity): see the module doc."""
    cfg = probe_config(params, job.model, job.benchmark, job.kinds)
    model = artifact_identity(cfg.model_dir / ARTIFACT_NAME)
    keys = stage_keys(params, "probe", model=job.model, benchmark=job.benchmark, kinds=job.kinds)
    inputs = {"model": model, "data": dataset_identity(load_manifest(cfg.prepared)), "kinds": list(job.kinds)}
    return stage_identity("probe", key_values(params, keys), inputs), model


def _say(line: str) -> None:
    """A job's default `log`: the line on stdout. A function of this module, so that it pickles into
    the spawned ranks by its name; `print` itself fails there once a library (Ray) has replaced
    `builtins.print` in the parent ("not the same object as builtins.print")."""
    print(line, flush=True)


def run_job(
    params: dict, job: ProbeJob, hooks: JobHooks = JobHooks(), log: Callable[[str], None] = _say
) -> dict[str, dict]:
    """Train and evaluate one job on its devices; returns {kind: probe-result dict} (docs/ARCHITECTURE.md).

    A job whose state holds its finished results (same identity) returns them: nothing is trained or evaluated."""
    identity, model = job_identity(params, job)
    spath = state_path(probe_config(params, job.model, job.benchmark, job.kinds))
    finished = finished_results(spath, identity)
    if finished is not None:
        log(f"[{job.model}/{job.name}] finished before (identity {identity[:12]}, {spath}): its results, reused")
        return finished
    devices = params["probe"]["benchmarks"][job.benchmark]["devices"]
    return run_on_devices(_run_rank, devices, params, job, (identity, model), hooks, log)


def _run_rank(
    device: torch.device,
    params: dict,
    job: ProbeJob,
    identities: tuple[str, str],
    hooks: JobHooks,
    log: Callable[[str], None],
) -> dict[str, dict] | None:
    """The job on this rank; rank 0 evaluates, keeps and returns the results, the other ranks None."""
    apply_threads(job_threads(params, job.benchmark))  # each rank's process, in a Ray task too
    start = time.perf_counter()
    identity, model = identities
    cfg = probe_config(params, job.model, job.benchmark, job.kinds)
    path = cfg.model_dir / ARTIFACT_NAME
    encoder, arch, _ = load_artifact_encoder(path, cfg.arch)
    encoder.to(device)
    _check_shapes(cfg, encoder)
    data = build_data(cfg, arch.img_size)
    sha = sha256_file(path)
    spath = state_path(cfg)
    banks = {
        s.kind: HeadBank(s.kind, encoder.width, data.num_classes, s.settings, s.options, s.seed) for s in cfg.sweeps
    }
    groups = []  # (source, features, trainers) per training transform
    for augmentation, sweeps in cfg.transform_groups().items():
        source, features = _train_source(cfg, encoder, data, augmentation, sweeps, arch.img_size, device)
        groups.append((source, features, [BankTrainer(banks[s.kind], s, len(source), device) for s in sweeps]))
    epochs = cfg.sweeps[0].epochs
    log(
        f"[{job.model}/{job.name}] kinds {list(cfg.kinds)}: {sum(len(b) for b in banks.values())} heads, "
        f"{data.num_train} train images, {len(groups)} training pass(es) per epoch "
        f"(features {', '.join(f for _, f, _ in groups)}), {epochs} epochs on {device} x {world()[1]}"
    )
    first, saved = _resume(spath, identity, groups, log, job)
    segments = _environments(saved, first, device, spath, log, job)
    for epoch in range(first, epochs):
        for source, _, trainers in groups:
            train_banks(trainers, source, epoch + 1, start_epoch=epoch)
        _end_epoch(spath, identity, epoch, groups, hooks, first, segments)
    features = {t.cfg.kind: f for _, f, ts in groups for t in ts}
    del groups
    results = None
    if world()[0] == 0:
        ids = {"identity": identity, "model_identity": model}
        results = {
            kind: {
                **_select(cfg, kind, banks[kind], encoder, data, device),
                **_facts(cfg, kind, features[kind], data, sha, str(device)),
                **ids,
                "environments": segments,
            }
            for kind in cfg.kinds
        }
        finish_state(spath, identity, results)
        wall = round(time.perf_counter() - start, 3)
        log_progress(spath, f"finished in {wall} s")
        log(f"[{job.model}/{job.name}] trained and evaluated in {wall} s")
    _barrier()
    return results


def _train_source(
    cfg: ProbeConfig,
    encoder: torch.nn.Module,
    data: JobData,
    augmentation: str,
    sweeps: tuple,
    img_size: int,
    device: torch.device,
) -> tuple[FeatureSource, str]:
    """Cached features when the batches are the same every epoch (no augmentation) and they fit."""
    train = data.train(augmentation, img_size, cfg.eval_resize, cfg.seed)
    drop_last = len(train) >= cfg.batch_size
    tokens = getattr(encoder, "grid", 1) ** 2  # N: a kind that keeps the token axis caches (N, d) per sample
    per_sample = sum(encoder.width * (tokens if probe_kind(s.kind).keeps_tokens else 1) * 4 for s in sweeps)
    if augmentation == "none" and len(train) * per_sample <= _cache_limit_bytes():
        feats, labels = cache_features(encoder, eval_loader(cfg, train), sweeps, device)
        return CachedFeatures(
            feats, labels, cfg.batch_size, seed=cfg.seed, drop_last=drop_last, device=device
        ), "cached"
    rank, size = world()
    return LiveFeatures(encoder, train_loader(cfg, train, rank, size, drop_last), sweeps, device), "recomputed"


def _cache_limit_bytes() -> float:
    return float(os.environ.get(CACHE_LIMIT_ENV, DEFAULT_CACHE_GB)) * 2**30


def _resume(
    spath: Path, identity: str, groups: list, log: Callable[[str], None], job: ProbeJob
) -> tuple[int, list[dict]]:
    """Load the saved state of this job into its trainers; returns the first epoch to train and the
    environments of the segments before it."""
    state = load_state(spath, identity)
    if state is None:
        if world()[0] == 0:
            log_progress(spath, "start epoch 0")
        return 0, []
    for _, _, trainers in groups:
        for t in trainers:
            t.load_state_dict(state["trainers"][t.cfg.kind])
    first = int(state["epochs_done"])
    if world()[0] == 0:
        log_progress(spath, f"resume epoch {first}")
    log(f"[{job.model}/{job.name}] resuming after epoch {first} from {spath}")
    return first, list(state.get("environments", []))


def _environments(
    saved: list[dict], first: int, device: torch.device, spath: Path, log: Callable[[str], None], job: ProbeJob
) -> list[dict]:
    """The environments of the job's segments (`xtra.environment`) with this one's from epoch `first`; a
    resume in another environment says so in the log and the job's progress log."""
    segments, changed = add_segment(saved, "from_epoch", first, environment(world()[1], device))
    if changed and world()[0] == 0:
        note = f"resumed at epoch {first} in another environment ({'; '.join(changed)})"
        log(f"[{job.model}/{job.name}] note: {note}: recorded as a segment of its own")
        log_progress(spath, note)
    return segments


def job_threads(params: dict, benchmark: str) -> int | None:
    """The job's torch threads: `probe.resources.threads`, or the benchmark's own
    (`probe.benchmarks.<b>.resources.threads`); None leaves torch's own choice."""
    own = params["probe"]["benchmarks"][benchmark].get("resources") or {}
    return own["threads"] if "threads" in own else params["probe"]["resources"]["threads"]


def _end_epoch(
    spath: Path, identity: str, epoch: int, groups: list, hooks: JobHooks, first: int, segments: list[dict]
) -> None:
    """Save the state (rank 0, atomically), then the fault-injection hooks of the tests."""
    if world()[0] == 0:
        trainers = {t.cfg.kind: t.state_dict() for _, _, ts in groups for t in ts}
        save_state(spath, identity, epoch + 1, trainers, segments)
    _barrier()
    if hooks.kill_after_epoch is not None and epoch + 1 == hooks.kill_after_epoch:
        os.kill(os.getpid(), signal.SIGKILL)
    if hooks.fail_after_epoch is not None and epoch + 1 == hooks.fail_after_epoch and first < epoch + 1:
        raise InjectedFailure(f"injected failure after epoch {epoch + 1} (state saved at {spath})")


def _barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _select(
    cfg: ProbeConfig, kind: str, bank: HeadBank, encoder: torch.nn.Module, data: JobData, device: torch.device
) -> dict:
    """Every head's accuracy, and the selection of the protocol (and the held-out one when run)."""
    sweep = cfg.sweep(kind)

    def scores_on(ds: torch.utils.data.Dataset) -> HeadScores:
        batches = encoded_batches(encoder, eval_loader(cfg, ds), sweep, device)
        return evaluate_bank(bank, batches, data.num_classes, device, sweep.precision)

    scores = scores_on(data.eval)
    heads = [
        {"lr": lr, "weight_decay": wd, "top1": scores.top1[i], "top5": scores.top5[i], "heldout_top1": None}
        for i, (lr, wd) in enumerate(sweep.settings)
    ]
    paper, heldout = _selection(sweep.settings, _best(scores.top1), scores), None
    if data.heldout is not None:
        held = scores_on(data.heldout)
        for head, value in zip(heads, held.top1):
            head["heldout_top1"] = value
        heldout = {
            **_selection(sweep.settings, _best(held.top1), scores),
            "heldout_top1": max(held.top1),
            "fraction": cfg.heldout_fraction,
            "num_heldout": held.count,
        }
    chosen = heldout if cfg.protocol == "heldout" else paper
    return {"protocol": cfg.protocol, **chosen, "heads": heads, "heldout": heldout, "num_eval": scores.count}


def _best(values: Sequence[float]) -> int:
    """Index of the highest value (the first of ties: the smallest lr of the lowest weight decay)."""
    return int(max(range(len(values)), key=lambda i: (values[i], -i)))


def _selection(settings: Sequence[tuple[float, float]], i: int, scores: HeadScores) -> dict:
    lr, wd = settings[i]
    return {"selected": {"lr": lr, "weight_decay": wd}, "top1": scores.top1[i], "top5": scores.top5[i]}


def _facts(cfg: ProbeConfig, kind: str, features: str, data: JobData, sha: str, device: str) -> dict:
    """The result file's description of the run (unchanged keys: the report reads them)."""
    sweep = cfg.sweep(kind)
    return {
        "model": cfg.model,
        "benchmark": cfg.benchmark,
        "kind": kind,
        "epochs": sweep.epochs,
        "seed": sweep.seed,
        "checkpoint_sha256": sha,
        "manifest_sha256": data.manifest_sha256,
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "num_train": data.num_train,
        "num_classes": data.num_classes,
        "images_seen_pretrain": _images_seen(cfg.model_dir / "metrics.json"),
        "dataset": cfg.dataset,
        "features": features,
        "augment": cfg.augment,
        "batch_size": cfg.batch_size,
        "accum_steps": sweep.accum_steps,
        "warmup_epochs": sweep.warmup_epochs,
        "grad_clip": sweep.grad_clip,
        "precision": sweep.precision,
        "device": device,
    }


def _images_seen(path: Path) -> int | None:
    """The pre-training's `images_seen` from the model's metrics.json (None when it has none)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("images_seen")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read images_seen: {exc}") from exc
    return int(value) if isinstance(value, (int, float)) else None


def write_results(params: dict, job: ProbeJob, results: dict[str, dict]) -> list[Path]:
    return [
        write_json_atomic(result_path(params, job.model, job.benchmark, kind), result, indent=1)
        for kind, result in results.items()
    ]
