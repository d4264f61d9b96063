"""`xtra pretrain MODEL`: pre-train (or initialise, or convert) one model of params.yaml.

Read top-down: `pretrain_model` builds the stage's typed config (`xtra.train.config`) and dispatches
on the model's `init`; `_train` is the pre-training: config -> data -> model -> trainer -> fit ->
finish. The step itself (data -> loss -> optimiser) is `xtra.train.module`.

Outputs in `<paths.models>/<model>/`:
- `checkpoints/<run id>/step-NNNNNN.ckpt`: resumable Lightning checkpoints of one run (see
  `xtra.train.identity`), every `checkpoint_every_n_steps` and at the end; the newest
  `keep_last_checkpoints` are kept (and every `keep_every_n_steps`-th). Re-running the same command
  resumes exactly from the newest readable one, on every rank;
- `run.json` (written at start: world size, batches, steps, schedule, resume source, parameter
  counts, precision, attention path) and `tb/<run id>/` (TensorBoard);
- on completion: `model.pt` (weights-only, `xtra.model.artifact`), `metrics.json`, `log.csv`,
  `val.csv` (validation loss, when `val_every_n_steps` > 0) and `reconstruction.png`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from xtra.atomic import write_json_atomic
from xtra.config import load_params
from xtra.errors import writing_to
from xtra.model.arch import ArchConfig
from xtra.model.artifact import ARTIFACT_NAME, save_model_artifact
from xtra.model.flops import peak_flops_per_s, train_flops_per_image
from xtra.model.mask import resolve_attn_impl
from xtra.model.xtra import XTRA
from xtra.train import identity
from xtra.train.checkpoints import (
    CheckSameResumeOnEveryRank,
    KeepCheckpoints,
    SameFolderCheckpointIO,
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
)
from xtra.train.reconstruct import write_model_reconstruction
from xtra.train.schedule import batches_per_epoch, steps_per_epoch

__all__ = ["configure_parser", "run", "pretrain_model", "FINAL_FILES"]

# the files that exist only once the stage has finished (model.pt is written last)
FINAL_FILES = (ARTIFACT_NAME, "metrics.json")

# The run folder holds the run's trajectory.json and logs before its first checkpoint, by design.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


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
    init, out = cfg.init, cfg.out
    with writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
        # a previous run's final files must not outlive a re-run that fails or is killed (every rank
        # gets here before any rank can have written new ones: they meet at the start of fit)
        for stale in FINAL_FILES:
            (out / stale).unlink(missing_ok=True)
        try:
            if init == "random":
                return _write_random(cfg)
            if init == "official":
                return _write_official(cfg)
            if init == "pixels":
                from xtra.probe.pixels import write_pixels_model  # the probe package's pixel floor

                write_pixels_model(cfg.model, cfg.arch, out)
                return out
            if init == "backbone":
                from xtra.release.backbones import write_backbone_model  # a comparison model built by timm

                write_backbone_model(params, cfg.model, out)
                return out
            return _train(cfg, params, restart)
        except BaseException:
            for leftover in (ARTIFACT_NAME + ".tmp", "log.csv.tmp", "reconstruction.tmp.png"):
                (out / leftover).unlink(missing_ok=True)
            if init != "pretrain":  # nothing to resume: no final file without the other
                for final in FINAL_FILES:
                    (out / final).unlink(missing_ok=True)
            raise


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def _write_random(cfg: PretrainConfig) -> Path:
    """The random-init control: the model as initialised with the run's seed, never trained."""
    L.seed_everything(cfg.seed, verbose=False)
    model = XTRA(ArchConfig.from_dict(cfg.arch))
    _write_json(cfg.out / "metrics.json", {"init": "random", "steps": 0, "images_seen": 0, "seed": cfg.seed})
    write_model_reconstruction(cfg, model)  # the control is drawn like the trained models
    save_model_artifact(
        cfg.out / ARTIFACT_NAME,
        init="random",
        arch=cfg.arch,
        state_dict=model.state_dict(),
        provenance={"seed": cfg.seed, "steps": 0},
    )
    print(f"{cfg.model}: wrote the random-init control to {cfg.out / ARTIFACT_NAME}")
    return cfg.out


def _write_official(cfg: PretrainConfig) -> Path:
    """A released checkpoint through the converter (`xtra.release.convert.convert_official`), with the
    model's `drop_prefixes`: weights-only loading, stored hyper_parameters checked, every key mapped or
    dropped; a fine-tuned release file becomes an encoder-only model file that probing accepts."""
    from xtra.release.convert import convert_official

    report = convert_official(cfg.checkpoint, cfg.out / ARTIFACT_NAME, cfg.arch, cfg.drop_prefixes)
    _write_json(cfg.out / "metrics.json", {"init": "official", "source": str(cfg.checkpoint), **report})
    return cfg.out


def _train(cfg: PretrainConfig, params: dict[str, Any], restart: bool) -> Path:
    """Pre-train a model: config -> data -> model -> trainer -> fit -> finish (see the module doc).

    `params` (the validated dict) gives the run's identity (`xtra.train.identity`), nothing else."""
    train, out = cfg.train, cfg.out
    L.seed_everything(cfg.seed, verbose=False)
    data = PretrainData(cfg.prepared, train, cfg.arch["img_size"], cfg.eval_resize, cfg.seed)
    trainer = _trainer(train)  # the world size is the trainer's, however `devices` is spelled
    values = identity.trajectory(params, cfg.model, trainer.world_size, identity.data_fingerprint(cfg.prepared))
    run = identity.run_id(values)
    steps = steps_per_epoch(len(data.train_set), train.batch_size, trainer.world_size, train.accumulate_grad_batches)
    module = PretrainModule(cfg.arch, train, steps, run, cfg.seed)
    trainer.fit_loop.epoch_loop.max_steps = module.total_steps
    run_dir = _run_dir(out, run, restart, trainer.is_global_zero)
    resume = find_resume_checkpoint(run_dir, run)  # every rank, read-only: no broadcast before fit
    plan = _plan(cfg, trainer, data, module, run, run_dir, resume)
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
    ]
    trainer.callbacks.append(  # last: it saves after the other callbacks' end-of-batch work
        KeepCheckpoints(
            train.keep_last_checkpoints,
            train.keep_every_n_steps,
            dirpath=run_dir,
            filename="step-{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=train.checkpoint_every_n_steps,
            save_top_k=-1,
            save_last=False,
        )
    )
    trainer.loggers = [TensorBoardLogger(save_dir=str(out / "tb"), name="", version=run, default_hp_metric=False)]
    if trainer.is_global_zero:
        _other_runs(out, run, values)
        _write_json(run_dir / "trajectory.json", values)
        _write_json(out / "run.json", plan)
        print(_summary(plan), flush=True)
    started = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if trainer.global_step % train.checkpoint_every_n_steps != 0 or trainer.global_step == 0:
        # the end state (same decision on every rank), so that extending epochs/max_steps continues from it
        trainer.save_checkpoint(run_dir / f"step-{trainer.global_step:06d}.ckpt")
    if trainer.is_global_zero:
        prune_checkpoints(run_dir, train.keep_last_checkpoints, train.keep_every_n_steps)
        _finish(cfg, module, trainer, plan, run_dir, time.time() - started)
    return out


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
        plugins=[SameFolderCheckpointIO()],
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
    run: str,
    run_dir: Path,
    resume: Path | None,
) -> dict[str, Any]:
    """What the run will do (run.json): its layout, batches, schedule, parameters and attention path."""
    train = cfg.train
    world, accum, batch = trainer.world_size, train.accumulate_grad_batches, train.batch_size
    device = trainer.strategy.root_device
    return {
        "model": cfg.model,
        "run_id": run,
        "run_dir": str(run_dir),
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
        "resume_from": str(resume) if resume else None,
        "parameters": {
            "total": sum(p.numel() for p in module.model.parameters()),
            "encoder": sum(p.numel() for p in module.model.encoder.parameters()),
        },
        "precision": train.precision,
        "strategy": train.strategy,
        "attention": resolve_attn_impl(module.model.cfg.attn_impl, device, training=False),
        "peak_flops_per_s": peak_flops_per_s(device),
        "val_every_n_steps": train.val_every_n_steps,
    }


def _summary(plan: dict[str, Any]) -> str:
    p = plan
    return (
        f"{p['model']}: run {p['run_id']} on {p['world_size']} process(es) ({p['num_nodes']} node(s) x "
        f"{p['devices_per_node']}), batch {p['batch_per_device']}/device x accumulate "
        f"{p['accumulate_grad_batches']} = {p['global_batch']} global; {p['batches_per_epoch']} batches = "
        f"{p['steps_per_epoch']} steps/epoch; warm-up {p['warmup_steps']}, total {p['total_steps']} steps; "
        f"{p['parameters']['total'] / 1e6:.2f}M params ({p['parameters']['encoder'] / 1e6:.2f}M encoder); "
        f"{p['precision']}, attention {p['attention']}; "
        + (f"resuming from {p['resume_from']}" if p["resume_from"] else "starting afresh")
    )


def _finish(
    cfg: PretrainConfig,
    module: PretrainModule,
    trainer: L.Trainer,
    plan: dict[str, Any],
    run_dir: Path,
    wall: float,
) -> None:
    """The final files (rank 0): metrics.json, the curves, the reconstruction, and model.pt last."""
    digests = {p.name: p.read_text().strip() for p in run_dir.glob("rank-*.sha256")}
    metrics = {
        "init": "pretrain",
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "images_seen": trainer.global_step * plan["global_batch"],
        "global_batch": plan["global_batch"],
        "final_loss": module.last_loss,
        "wall_time_s": round(wall, 2),
        "world_size": trainer.world_size,
        "ranks_in_sync": len(set(digests.values())) <= 1,
        "run_id": plan["run_id"],
        "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),  # the schedule's rate after the last step
    }
    out = cfg.out
    for log in ("log.csv", "val.csv"):  # this run's curves, where dvc plots finds them
        if (run_dir / log).exists():
            shutil.copyfile(run_dir / log, out / f"{log}.tmp")
            (out / f"{log}.tmp").replace(out / log)
    write_model_reconstruction(cfg, module.model)
    _write_json(out / "metrics.json", metrics)
    provenance = {k: metrics[k] for k in ("steps", "images_seen", "run_id", "final_loss")}
    save_model_artifact(
        out / ARTIFACT_NAME,
        init="pretrain",
        arch=cfg.arch,
        state_dict=module.model.state_dict(),
        provenance={
            **provenance,
            "checkpoint": str(run_dir / f"step-{trainer.global_step:06d}.ckpt"),
            "resolved_arch": asdict(module.model.cfg),
        },
    )
    print(f"{cfg.model}: {metrics['steps']} steps, final loss {metrics['final_loss']}, wrote {out / ARTIFACT_NAME}")
