"""`xtra pretrain MODEL`: pre-train (or initialise, or convert) one model of params.yaml.

Read top-down: `pretrain_model` builds the stage's typed config (`xtra.train.config`) and dispatches
on the model's `init`; `_train` is the pre-training: config -> data -> model -> trainer -> fit ->
finish. The step itself (data -> loss -> optimiser) is `xtra.train.module`.

Outputs in `<paths.models>/<model>/`:
- `checkpoints/<run id>/step-NNNNNN.ckpt`: resumable Lightning checkpoints of one run (see
  `xtra.train.identity`), every `checkpoint_every_n_steps` and at the end; the newest
  `keep_last_checkpoints` are kept (and every `keep_every_n_steps`-th). Re-running the same command
  resumes exactly from the newest readable one, on every rank. Each records the last loss and the
  run's schedule segments;
- `run.json` (the plan, written at start: world size, batches, steps, schedule, resume source,
  parameter counts, precision, attention path; and when fit ends, its wall time) and `tb/<run id>/`
  (TensorBoard);
- on completion: `model.pt` (weights-only, `xtra.model.artifact`) and `metrics.json`, the stage's
  outputs, plus `log.csv`, `val.csv` (validation loss, when `val_every_n_steps` > 0) and
  `reconstruction.png`.

Identity and reuse (`xtra.identity`). A trained model's identity is its run's id, the steps taken and
the schedule segments they were taken under (`model_identity`); any other model's is its params keys
and source file (`stage_identity`). It is written into model.pt's provenance and metrics.json, which
are pure functions of the final checkpoint and the identity (no time, no absolute path), so:
- a finished run asked again (a forced re-run, a Slurm resubmission, a params edit that does not
  change the identity) trains nothing: an existing model.pt of the same identity is left untouched,
  and missing final files (DVC deletes a stage's outputs before running it) are written again from
  the final checkpoint, byte for byte;
- a longer run (epochs or max_steps raised) continues the run: a new schedule segment begins at the
  step it had reached;
- a run asked for fewer steps than it has taken is refused, naming `models.<m>.train.epochs` /
  `max_steps` (the shorter model is another result: `--restart` begins the run afresh).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from xtra.atomic import sha256_file, write_atomic, write_json_atomic
from xtra.config import load_params
from xtra.environment import apply_threads, environment
from xtra.errors import CheckpointError, ParamsError, writing_to
from xtra.identity import key_values, model_identity, stage_identity, stage_keys
from xtra.model.arch import ArchConfig
from xtra.model.artifact import ARTIFACT_NAME, read_model_artifact, save_model_artifact
from xtra.model.flops import peak_flops_per_s, train_flops_per_image
from xtra.model.mask import resolve_attn_impl
from xtra.model.xtra import XTRA
from xtra.timelimit import AttemptLog, StopForResubmission, release_stop_signals
from xtra.train import identity
from xtra.train.checkpoints import (
    CheckSameResumeOnEveryRank,
    KeepCheckpoints,
    SameFolderCheckpointIO,
    cluster_plugins,
    find_resume_checkpoint,
    prune_checkpoints,
)
from xtra.train.config import PretrainConfig, TrainConfig
from xtra.train.module import (
    DigestRankWeights,
    LogSteps,
    LogValidationLoss,
    PretrainData,
    PretrainModule,
    RebuildBucketsOnResume,
    RecordEnvironments,
)
from xtra.train.online import OnlineProbes, online_num_classes
from xtra.train.reconstruct import write_model_reconstruction
from xtra.train.schedule import batches_per_epoch, release_warmup_cosine, schedule_steps, steps_per_epoch

__all__ = ["configure_parser", "run", "pretrain_model", "FINAL_FILES", "init_identity"]

# the files that exist only once the stage has finished (model.pt is written last)
FINAL_FILES = (ARTIFACT_NAME, "metrics.json")

# The run folder holds the run's trajectory.json and logs before its first checkpoint, by design.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Lightning looks for a loader position in the loaders only; ours is the data module's state (the
# batches done of the epoch, `PretrainData.state_dict`), from which a resumed loader continues exactly.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a key of `models` in params.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="begin this run afresh: its checkpoint folder is moved aside (never deleted)",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    pretrain_model(params, args.model, restart=args.restart)
    return 0


def pretrain_model(params: dict[str, Any], name: str, restart: bool = False) -> Path:
    """Run the pretrain stage for model `name` of validated params; returns its output directory."""
    cfg = PretrainConfig.from_params(params, name)
    apply_threads(cfg.threads)  # resources.threads, in every rank (each runs this command)
    init, out = cfg.init, cfg.out
    with writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
        if init == "pretrain":
            try:
                return _train(cfg, params, restart)
            except BaseException:
                for leftover in (ARTIFACT_NAME + ".tmp", "log.csv.tmp", "reconstruction.tmp.png"):
                    (out / leftover).unlink(missing_ok=True)
                raise
        release_stop_signals()  # no training to save: the scheduler's signals end the job as they would
        ident = init_identity(params, name)
        if _is_current(out, ident):
            print(f"{name}: up to date ({out / ARTIFACT_NAME}, identity {ident[:12]}): left untouched")
            return out
        _remove_final_files(out)
        try:
            if init == "random":
                return _write_random(cfg, ident)
            if init == "official":
                return _write_official(cfg, ident)
            if init == "pixels":
                from xtra.probe.pixels import write_pixels_model  # the probe package's pixel floor

                write_pixels_model(cfg.model, cfg.arch, out, identity=ident)
                return out
            from xtra.release.backbones import write_backbone_model  # a comparison model built by timm

            write_backbone_model(params, cfg.model, out, identity=ident)
            return out
        except BaseException:
            _remove_final_files(out)  # nothing to resume: no final file without the other
            raise


def init_identity(params: dict[str, Any], name: str) -> str:
    """The identity of a model that is not trained (random, pixels, official, backbone): its params keys
    (`xtra.identity.stage_keys`) and, for a converted one, the sha256 of its source file."""
    model = params["models"][name]
    inputs = {"source": sha256_file(model["checkpoint"])} if model["init"] in ("official", "backbone") else {}
    return stage_identity("pretrain", key_values(params, stage_keys(params, "pretrain", model=name)), inputs)


def _is_current(out: Path, ident: str) -> bool:
    """Both final files are there and carry this identity."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
        return (
            metrics.get("identity") == ident
            and read_model_artifact(out / ARTIFACT_NAME).provenance.get("identity") == ident
        )
    except (OSError, ValueError, CheckpointError):
        return False


def _remove_final_files(out: Path) -> None:
    """A previous result's final files must not outlive a re-run that fails or is killed (every rank
    gets here before any rank can have written new ones: they meet at the start of fit)."""
    for final in FINAL_FILES:
        (out / final).unlink(missing_ok=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def _write_random(cfg: PretrainConfig, ident: str) -> Path:
    """The random-init control: the model as initialised with the run's seed, never trained."""
    L.seed_everything(cfg.seed, verbose=False)
    model = XTRA(ArchConfig.from_dict(cfg.arch))
    metrics = {"identity": ident, "init": "random", "steps": 0, "images_seen": 0, "seed": cfg.seed}
    _write_json(cfg.out / "metrics.json", metrics)
    write_model_reconstruction(cfg, model)  # the control is drawn like the trained models
    save_model_artifact(
        cfg.out / ARTIFACT_NAME,
        init="random",
        arch=cfg.arch,
        state_dict=model.state_dict(),
        provenance={"identity": ident, "seed": cfg.seed, "steps": 0},
    )
    print(f"{cfg.model}: wrote the random-init control to {cfg.out / ARTIFACT_NAME}")
    return cfg.out


def _write_official(cfg: PretrainConfig, ident: str) -> Path:
    """A released checkpoint through the converter (`xtra.release.convert.convert_official`), with the
    model's `drop_prefixes`: weights-only loading, stored hyper_parameters checked, every key mapped or
    dropped; a fine-tuned release file becomes an encoder-only model file that probing accepts."""
    from xtra.release.convert import convert_official

    report = convert_official(cfg.checkpoint, cfg.out / ARTIFACT_NAME, cfg.arch, cfg.drop_prefixes, identity=ident)
    _write_json(
        cfg.out / "metrics.json", {"identity": ident, "init": "official", "source": str(cfg.checkpoint), **report}
    )
    return cfg.out


def _train(cfg: PretrainConfig, params: dict[str, Any], restart: bool) -> Path:
    """Pre-train a model: config -> data -> model -> trainer -> fit -> finish (see the module doc).

    `params` (the validated dict) gives the run's identity (`xtra.train.identity`), nothing else."""
    train, out = cfg.train, cfg.out
    L.seed_everything(cfg.seed, verbose=False)
    data = PretrainData(cfg.prepared, train, cfg.arch["img_size"], cfg.eval_resize, cfg.seed)
    trainer = _trainer(train)  # the world size is the trainer's, however `devices` is spelled
    values = identity.trajectory(params, cfg.model, trainer.world_size, identity.data_identity(cfg.prepared))
    online = None
    if cfg.online_probe.on:  # the heads live in the run's checkpoints: another folder, the same model
        online = {**cfg.online_probe.identity(), "data": identity.data_identity(cfg.online_probe.prepared)}
    values, trajectory_id = identity.run_values(values, online), identity.run_id(values)
    run = identity.run_id(values)
    steps = steps_per_epoch(len(data.train_set), train.batch_size, trainer.world_size, train.accumulate_grad_batches)
    run_dir = _run_dir(out, run, restart, trainer.is_global_zero)
    resume = find_resume_checkpoint(run_dir, run)  # every rank, read-only: no broadcast before fit
    taken, segments, last_loss = _progress(resume)
    total = schedule_steps(train, steps)[1]
    if taken > total:
        raise ParamsError(
            f"models.{cfg.model}.train.epochs ({train.epochs}) / max_steps ({train.max_steps}) ask for {total} "
            f"steps, but run {run} has taken {taken} ({resume}): a shorter run is another model. Raise "
            f"models.{cfg.model}.train.epochs or max_steps to cover {taken} steps, or begin the run afresh with "
            f"`xtra pretrain {cfg.model} --restart` (its checkpoints are moved aside, never deleted)"
        )
    if not segments or segments[-1]["total_steps"] != total:  # a new run, or one extended: a new segment
        segments = [*segments, {"start_step": taken, "epochs": train.epochs, "max_steps": train.max_steps}]
        segments[-1]["total_steps"] = total
    attempts = AttemptLog(run_dir / "attempts.json", "step", f"xtra pretrain {cfg.model}")
    attempts.check_progress(taken)  # every rank, read-only: a resubmitted job that cannot progress stops
    module = PretrainModule(cfg.arch, train, steps, run, cfg.seed, segments=segments, last_loss=last_loss)
    trainer.fit_loop.epoch_loop.max_steps = module.total_steps
    plan = _plan(cfg, trainer, data, module, values["data"], trajectory_id, run_dir, resume)
    finished = resume is not None and taken == total  # its final files come from its last checkpoint
    if trainer.is_global_zero:
        _other_runs(out, run, values)
        _write_json(run_dir / "trajectory.json", values)
        _write_json(out / "run.json", plan)
        done = (
            f"{cfg.model}: run {run} has taken its {total} steps ({resume.name}): nothing to train" if finished else ""
        )
        print(done or _summary(plan), *attempts.history(), sep="\n", flush=True)
    if finished:
        final = resume
    else:
        _remove_final_files(out)
        final = _fit(cfg, trainer, data, module, plan, run_dir, resume, attempts, taken)
    if trainer.is_global_zero:
        _finish(cfg, module, final, plan, run_dir)
    return out


def _progress(resume: Path | None) -> tuple[int, list[dict[str, int]], float | None]:
    """(steps taken, schedule segments, last loss) of the checkpoint a run resumes from; (0, [], None) without."""
    if resume is None:
        return 0, [], None
    ckpt = torch.load(resume, map_location="cpu", weights_only=False, mmap=True)
    if "segments" not in ckpt:
        raise CheckpointError(f"{resume} records no schedule segments (written by an older xtra): --restart the run")
    return int(ckpt["global_step"]), list(ckpt["segments"]), ckpt.get("last_loss")


def _fit(
    cfg: PretrainConfig,
    trainer: L.Trainer,
    data: PretrainData,
    module: PretrainModule,
    plan: dict[str, Any],
    run_dir: Path,
    resume: Path | None,
    attempts: AttemptLog,
    taken: int,
) -> Path:
    """Train from `resume` (or from scratch) to the scheduled steps; returns the final checkpoint.

    A stop signal (xtra.timelimit) ends it early: KeepCheckpoints saves the step reached and raises
    StopForResubmission; the attempt's end is recorded in `attempts` either way."""
    train, out = cfg.train, cfg.out
    trainer.callbacks[:0] = [
        LogSteps(
            run_dir / "log.csv",
            train.log_every_n_steps,
            plan["global_batch"],
            train_flops_per_image(module.model.cfg),
            plan["peak_flops_per_s"],
        ),
        LogValidationLoss(run_dir / "val.csv"),
        DigestRankWeights(run_dir),
        CheckSameResumeOnEveryRank(resume),
        RebuildBucketsOnResume(),  # exact resume at 3+ DDP ranks
        RecordEnvironments(),
    ]
    if cfg.online_probe.on:  # before the checkpoints: a checkpoint holds the heads trained on its step
        classes = online_num_classes(cfg)  # refuses a set without labels, naming the key
        trainer.callbacks.insert(2, OnlineProbes(cfg, classes, run_dir / "online.csv", plan["global_batch"]))
    trainer.callbacks.append(  # last: it saves after the other callbacks' end-of-batch work
        KeepCheckpoints(
            train.keep_last_checkpoints,
            train.keep_every_n_steps,
            attempts,
            taken,
            dirpath=run_dir,
            filename="step-{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=train.checkpoint_every_n_steps,
            save_top_k=-1,
            save_last=False,
        )
    )
    trainer.loggers = [
        TensorBoardLogger(save_dir=str(out / "tb"), name="", version=plan["run_id"], default_hp_metric=False)
    ]
    started = time.time()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    except SIGTERMException as exc:  # Lightning's own stop: a SIGTERM before KeepCheckpoints took the signal over
        raise StopForResubmission(
            f"SIGTERM before the first step of this attempt: nothing new saved ({run_dir})"
        ) from exc
    except Exception as exc:
        if trainer.is_global_zero:
            attempts.end("failed", trainer.global_step, error=f"{type(exc).__name__}: {exc}"[:300])
        raise
    if trainer.is_global_zero:
        attempts.end("finished", trainer.global_step)
    final = run_dir / f"step-{trainer.global_step:06d}.ckpt"
    if trainer.global_step % train.checkpoint_every_n_steps != 0 or trainer.global_step == 0:
        # the end state (same decision on every rank), so that extending epochs/max_steps continues from it
        trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        prune_checkpoints(run_dir, train.keep_last_checkpoints, train.keep_every_n_steps)
        wall = round(time.time() - started, 2)  # a timing: in the log and run.json, never in an output
        _write_json(out / "run.json", {**plan, "fit_wall_time_s": wall, "fit_steps": trainer.global_step})
        print(f"{cfg.model}: fit ended at step {trainer.global_step} after {wall} s", flush=True)
    return final


def _trainer(train: TrainConfig) -> L.Trainer:
    val = train.val_every_n_steps
    return L.Trainer(
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        precision=train.precision,
        max_epochs=train.epochs,
        gradient_clip_val=train.grad_clip or None,
        accumulate_grad_batches=train.accumulate_grad_batches,
        logger=False,
        enable_checkpointing=False,  # no default ModelCheckpoint: KeepCheckpoints is added by _train
        use_distributed_sampler=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=train.log_every_n_steps,
        plugins=[SameFolderCheckpointIO(), *cluster_plugins()],
        val_check_interval=val * train.accumulate_grad_batches if val > 0 else None,
        check_val_every_n_epoch=None if val > 0 else 1,
        limit_val_batches=1.0 if val > 0 else 0,
        callbacks=[TQDMProgressBar(refresh_rate=max(1, train.log_every_n_steps))],
    )


def _run_dir(out: Path, run: str, restart: bool, is_zero: bool) -> Path:
    """This run's checkpoint folder; with `restart`, rank 0 first moves an existing one aside."""
    run_dir = out / "checkpoints" / run
    if restart and is_zero and run_dir.exists():
        aside = run_dir.with_name(f"{run}.restarted-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        run_dir.rename(aside)
        print(f"--restart: moved the previous checkpoints of run {run} to {aside}")
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # temporary files of a save that was killed
            stale.unlink()
    return run_dir


def _other_runs(out: Path, run: str, values: dict[str, Any]) -> None:
    """Say which keys differ from the newest other run of this model (kept in its own folder)."""
    others = sorted(
        (p for p in (out / "checkpoints").glob("*/trajectory.json") if p.parent.name != run),
        key=lambda p: p.stat().st_mtime,
    )
    if others:
        old = json.loads(others[-1].read_text())
        changes = "; ".join(identity.changed_keys(old, values)) or "none"
        print(f"note: run {run} differs from run {others[-1].parent.name} (kept, untouched) in: {changes}")


def _plan(
    cfg: PretrainConfig,
    trainer: L.Trainer,
    data: PretrainData,
    module: PretrainModule,
    data_identity: str,
    trajectory_id: str,
    run_dir: Path,
    resume: Path | None,
) -> dict[str, Any]:
    """What the run will do (run.json): its layout, data, batches, schedule, parameters and attention path.
    `run_id` names its folder, `trajectory_id` the model's trajectory (the same without online probes)."""
    train = cfg.train
    world, accum, batch = trainer.world_size, train.accumulate_grad_batches, train.batch_size
    device = trainer.strategy.root_device
    return {
        "model": cfg.model,
        "run_id": module.hparams["run_id"],
        "trajectory_id": trajectory_id,
        "run_dir": str(run_dir),
        "data": data_identity,
        "world_size": world,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "batch_per_device": batch,
        "accumulate_grad_batches": accum,
        "global_batch": batch * world * accum,
        "samples_per_epoch": len(data.train_set),
        "batches_per_epoch": batches_per_epoch(len(data.train_set), batch, world),
        "steps_per_epoch": module.steps_per_epoch,
        "warmup_steps": module.warmup_steps,
        "total_steps": module.total_steps,
        "schedule": "release_warmup_cosine",
        "segments": module.segments,
        "resume_from": str(resume) if resume else None,
        "parameters": {
            "total": sum(p.numel() for p in module.model.parameters()),
            "encoder": sum(p.numel() for p in module.model.encoder.parameters()),
        },
        "precision": train.precision,
        "strategy": train.strategy,
        "attention": resolve_attn_impl(module.model.cfg.attn_impl, device, training=False),
        "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        "peak_flops_per_s": peak_flops_per_s(device),
        "val_every_n_steps": train.val_every_n_steps,
        "environment": environment(world, device),
        "online_probe": _online_plan(cfg, module),
    }


def _online_plan(cfg: PretrainConfig, module: PretrainModule) -> dict[str, Any] | None:
    """What the online heads train on and what that costs (run.json)."""
    online = cfg.online_probe
    if not online.on:
        return None
    if online.dataset is not None:
        feed = f"dataset {online.dataset} (train split): one extra encoder forward a micro-batch"
    elif module.model.block_orders is None:
        feed = "the training forward's block outputs (no extra forward)"
    else:
        feed = "the training batch again in raster order: one extra encoder forward a micro-batch"
    return {"kinds": list(online.kinds), "lrs": list(online.lrs), "features": feed, "eval_split": online.eval_split}


def _summary(plan: dict[str, Any]) -> str:
    p = plan
    return (
        f"{p['model']}: run {p['run_id']} on {p['world_size']} process(es) ({p['num_nodes']} node(s) x "
        f"{p['devices_per_node']}), batch {p['batch_per_device']}/device x accumulate "
        f"{p['accumulate_grad_batches']} = {p['global_batch']} global; {p['batches_per_epoch']} batches = "
        f"{p['steps_per_epoch']} steps/epoch; warm-up {p['warmup_steps']}, total {p['total_steps']} steps; "
        f"{p['parameters']['total'] / 1e6:.2f}M params ({p['parameters']['encoder'] / 1e6:.2f}M encoder); "
        f"{p['precision']}, attention {p['attention']}, {p['environment']['threads']} torch thread(s); "
        + (f"resuming from {p['resume_from']}" if p["resume_from"] else "starting afresh")
    )


def _finish(cfg: PretrainConfig, module: PretrainModule, final: Path, plan: dict[str, Any], run_dir: Path) -> None:
    """The final files (rank 0), pure functions of the final checkpoint and the model's identity:
    metrics.json, then (unless model.pt of this identity is there) the curves, the reconstruction and
    model.pt last."""
    ckpt = torch.load(final, map_location="cpu", weights_only=False, mmap=True)
    steps, segments = int(ckpt["global_step"]), list(ckpt["segments"])
    ident = model_identity(plan["trajectory_id"], steps, segments)  # online heads or not: the same weights
    digests = {p.name: p.read_text().strip() for p in run_dir.glob("rank-*.sha256")}
    train, last = cfg.train, segments[-1]
    metrics = {
        "identity": ident,
        "init": "pretrain",
        "run_id": plan["run_id"],
        "data": plan["data"],
        "steps": steps,
        "epochs": round(steps / plan["steps_per_epoch"], 6),
        "images_seen": steps * plan["global_batch"],
        "global_batch": plan["global_batch"],
        "segments": segments,
        "final_loss": ckpt.get("last_loss"),
        "world_size": plan["world_size"],
        "ranks_in_sync": len(set(digests.values())) <= 1,
        # the schedule's rate after the last step, under the segment it was taken in
        "final_lr": release_warmup_cosine(
            steps, train.lr, last["total_steps"], module.warmup_steps, train.warmup_start_lr, train.min_lr
        ),
        "environments": list(ckpt["environments"]),  # each segment's (RecordEnvironments), no identity
    }
    online = run_dir / "online.csv"
    if online.exists() and cfg.online_probe.on:  # the best head of each kind at the last evaluation
        with online.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            last_step = int(rows[-1]["step"])
            metrics["online"] = {"step": last_step, "top1": {}}
            for row in rows:
                if int(row["step"]) == last_step:
                    best = metrics["online"]["top1"].get(row["kind"], -1.0)
                    metrics["online"]["top1"][row["kind"]] = max(best, float(row["top1"]))
    out = cfg.out
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    if not (out / "metrics.json").is_file() or (out / "metrics.json").read_text() != text:
        write_atomic(out / "metrics.json", text)
    if online.exists() and cfg.online_probe.on:  # the online curve is this run's, whichever model.pt is there
        shutil.copyfile(online, out / "online.csv.tmp")
        (out / "online.csv.tmp").replace(out / "online.csv")
    if _is_current(out, ident):
        print(f"{cfg.model}: {ARTIFACT_NAME} of identity {ident[:12]} is there ({steps} steps): left untouched")
        return
    for log in ("log.csv", "val.csv"):  # this run's curves, where dvc plots finds them
        if (run_dir / log).exists():
            shutil.copyfile(run_dir / log, out / f"{log}.tmp")
            (out / f"{log}.tmp").replace(out / log)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    module.model.load_state_dict(state)
    write_model_reconstruction(cfg, module.model)
    save_model_artifact(
        out / ARTIFACT_NAME,
        init="pretrain",
        arch=cfg.arch,
        state_dict=state,
        provenance={
            **{k: metrics[k] for k in ("identity", "run_id", "data", "steps", "images_seen", "segments")},
            **{k: metrics[k] for k in ("final_loss", "environments")},
            "checkpoint": final.relative_to(out).as_posix(),  # relative: no absolute path in an output
            "resolved_arch": asdict(module.model.cfg),
        },
    )
    print(
        f"{cfg.model}: {steps} steps, final loss {metrics['final_loss']}, "
        f"wrote {out / ARTIFACT_NAME} (identity {ident[:12]})"
    )
