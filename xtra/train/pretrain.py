"""`xtra pretrain MODEL`: pre-train (or initialise, or convert) one model of params.yaml.

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
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xtra.atomic import save_torch_atomic, write_json_atomic
from xtra.config import load_params
from xtra.errors import CheckpointError, ParamsError, writing_to
from xtra.model.arch import ArchConfig
from xtra.model.artifact import ARTIFACT_NAME, save_model_artifact
from xtra.model.xtra import XTRA
from xtra.train import identity
from xtra.train.data import PretrainData, batches_per_epoch, steps_per_epoch
from xtra.train.pretrain_module import PretrainModule, RankDigest, StepLog, ValLog

# the files that exist only once the stage has finished (model.pt is written last)
FINAL_FILES = (ARTIFACT_NAME, "metrics.json")

__all__ = ["configure_parser", "run", "pretrain_model", "find_resume_checkpoint", "FINAL_FILES"]


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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def pretrain_model(params: dict[str, Any], name: str, restart: bool = False) -> Path:
    """Run the pretrain stage for model `name`; returns its output directory."""
    if name not in params["models"]:
        raise ParamsError(f"models.{name}: no such model; known: {sorted(params['models'])}")
    model_cfg = params["models"][name]
    out = Path(params["paths"]["models"]) / name
    with writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
        # a previous run's final files must not outlive a re-run that fails or is killed (every rank
        # gets here before any rank can have written new ones: they meet at the start of fit)
        for stale in FINAL_FILES:
            (out / stale).unlink(missing_ok=True)
        try:
            if model_cfg["init"] == "random":
                return _write_random(params, name, out)
            if model_cfg["init"] == "official":
                return _write_official(params, name, out)
            if model_cfg["init"] == "pixels":
                from xtra.model.pixels import write_pixels_model  # the probe package's pixel floor

                return write_pixels_model(params, name, out)
            if model_cfg["init"] == "backbone":
                from xtra.release.backbones import write_backbone_model  # a comparison model built by timm

                write_backbone_model(params, name, out)
                return out
            return _train(params, name, out, restart)
        except BaseException:
            for leftover in (ARTIFACT_NAME + ".tmp", "log.csv.tmp", "reconstruction.tmp.png"):
                (out / leftover).unlink(missing_ok=True)
            if model_cfg["init"] != "pretrain":  # nothing to resume: no final file without the other
                for final in FINAL_FILES:
                    (out / final).unlink(missing_ok=True)
            raise


def _write_random(params: dict[str, Any], name: str, out: Path) -> Path:
    """The random-init control: the model as initialised with the run's seed, never trained."""
    arch = params["models"][name]["arch"]
    L.seed_everything(params["seed"], verbose=False)
    model = XTRA(ArchConfig.from_dict(arch))
    _write_json(out / "metrics.json", {"init": "random", "steps": 0, "images_seen": 0, "seed": params["seed"]})
    from xtra.reconstruct import write_model_reconstruction

    write_model_reconstruction(params, name, model, out)  # the control is drawn like the trained models
    save_model_artifact(
        out / ARTIFACT_NAME,
        init="random",
        arch=arch,
        state_dict=model.state_dict(),
        provenance={"seed": params["seed"], "steps": 0},
    )
    print(f"{name}: wrote the random-init control to {out / ARTIFACT_NAME}")
    return out


def _write_official(params: dict[str, Any], name: str, out: Path) -> Path:
    """A released checkpoint through the converter (`xtra.release.convert.convert_official`), with the
    model's `drop_prefixes`: weights-only loading, stored hyper_parameters checked, every key mapped or
    dropped; a fine-tuned release file becomes an encoder-only model file that probing accepts."""
    from xtra.release.convert import convert_official

    model = params["models"][name]
    report = convert_official(model["checkpoint"], out / ARTIFACT_NAME, model["arch"], model["drop_prefixes"])
    _write_json(out / "metrics.json", {"init": "official", "source": str(model["checkpoint"]), **report})
    return out


def _read_resumable(path: Path) -> dict[str, Any]:
    """The small part of a checkpoint that decides whether it resumes this run (mapped, not read whole)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, with its reason
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated?): {exc}") from exc
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint")
    return {"global_step": int(ckpt["global_step"]), "run_id": (ckpt.get("hyper_parameters") or {}).get("run_id")}


def find_resume_checkpoint(run_dir: Path, expected_run: str) -> Path | None:
    """The newest readable checkpoint of this run, or None. Read-only: every rank calls it itself.

    A file that cannot be read (a truncated or foreign one) is skipped with a warning; nothing is
    deleted. A checkpoint naming another run is an error (it was copied into the wrong folder).
    """
    if not run_dir.is_dir():
        return None
    for path in sorted(run_dir.glob("step-*.ckpt"), reverse=True):
        try:
            info = _read_resumable(path)
        except CheckpointError as exc:
            print(f"warning: skipping unreadable checkpoint {path}: {exc}")
            continue
        if info["run_id"] != expected_run:
            raise CheckpointError(f"{path} belongs to run {info['run_id']!r}, not {expected_run!r} (its folder)")
        return path
    return None


class _SameFolderCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint through a temporary file beside it, then a rename.

    Lightning's own save copies a temporary file from $TMPDIR over the final name: a full disk then
    leaves a truncated `step-*.ckpt`, and $TMPDIR needs a whole checkpoint's space free.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # refuses them, with Lightning's message
            return
        save_torch_atomic(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The resumed checkpoint memory-mapped: its tensors are paged in as they are copied into the
        model and optimiser, so a resume does not hold a second ~10 GB (H/14 with AdamW) in memory."""
        return torch.load(path, map_location=map_location or "cpu", mmap=True, weights_only=False)


class RetainedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the newest `keep_last` step checkpoints (and every `keep_every`-th step)."""

    def __init__(self, keep_last: int, keep_every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_last, self.keep_every = keep_last, keep_every

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            prune_checkpoints(Path(filepath).parent, self.keep_last, self.keep_every)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Remove step checkpoints beyond the newest `keep_last`, except multiples of `keep_every`; returns them."""

    def step_of(path: Path) -> int:
        return int(path.stem.split("-")[1])

    ckpts = sorted(run_dir.glob("step-*.ckpt"), key=step_of)
    old = ckpts[:-keep_last] if keep_last > 0 else []
    removed = [p for p in old if not (keep_every > 0 and step_of(p) % keep_every == 0)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class _SameResumeOnEveryRank(L.Callback):
    """Once the process group exists: every rank must resume from the same checkpoint (shared storage)."""

    def __init__(self, resume: Path | None) -> None:
        self.resume = str(resume) if resume else ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        chosen = trainer.strategy.broadcast(self.resume)
        if not trainer.strategy.reduce_boolean_decision(chosen == self.resume, all=True):
            raise CheckpointError(
                f"rank {trainer.global_rank} resumes from {self.resume or 'nothing'!r}, rank 0 "
                f"from {chosen or 'nothing'!r}: the ranks do not see the same checkpoint folder"
            )


# The run folder holds the run's trajectory.json and logs before its first checkpoint, by design.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _trainer(train: dict[str, Any]) -> L.Trainer:
    val = train["val_every_n_steps"]
    return L.Trainer(
        accelerator=train["accelerator"],
        devices=train["devices"],
        num_nodes=train["num_nodes"],
        strategy=train["strategy"],
        precision=train["precision"],
        max_epochs=train["epochs"],
        gradient_clip_val=train["grad_clip"] or None,
        accumulate_grad_batches=train["accumulate_grad_batches"],
        logger=False,
        enable_checkpointing=False,  # no default ModelCheckpoint: RetainedCheckpoint is added later
        use_distributed_sampler=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=train["log_every_n_steps"],
        plugins=[_SameFolderCheckpointIO()],
        val_check_interval=val * train["accumulate_grad_batches"] if val > 0 else None,
        check_val_every_n_epoch=None if val > 0 else 1,
        limit_val_batches=1.0 if val > 0 else 0,
        callbacks=[TQDMProgressBar(refresh_rate=max(1, train["log_every_n_steps"]))],
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
    import json

    others = sorted(
        (p for p in (out / "checkpoints").glob("*/trajectory.json") if p.parent.name != run),
        key=lambda p: p.stat().st_mtime,
    )
    if others:
        old = json.loads(others[-1].read_text())
        changes = "; ".join(identity.changed_keys(old, values)) or "none"
        print(f"note: run {run} differs from run {others[-1].parent.name} (kept, untouched) in: {changes}")


def _counts(model: XTRA) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
    }


def _plan(
    params: dict[str, Any],
    name: str,
    trainer: L.Trainer,
    data: PretrainData,
    module: PretrainModule,
    run: str,
    run_dir: Path,
    resume: Path | None,
) -> dict[str, Any]:
    from xtra.model.bench import peak_flops_per_s, resolved_attention

    train = params["models"][name]["train"]
    world, accum, batch = trainer.world_size, train["accumulate_grad_batches"], train["batch_size"]
    return {
        "model": name,
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
        "parameters": _counts(module.model),
        "precision": train["precision"],
        "strategy": train["strategy"],
        "attention": resolved_attention(module.model.cfg.attn_impl, trainer.strategy.root_device),
        "peak_flops_per_s": peak_flops_per_s(trainer.strategy.root_device),
        "val_every_n_steps": train["val_every_n_steps"],
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


def _train(params: dict[str, Any], name: str, out: Path, restart: bool) -> Path:
    from lightning.pytorch.loggers import TensorBoardLogger

    from xtra.model.bench import train_flops_per_image

    model_cfg = params["models"][name]
    train, seed = model_cfg["train"], params["seed"]
    L.seed_everything(seed, verbose=False)
    root = Path(params["paths"]["prepared"]) / model_cfg["dataset"]
    data = PretrainData(root, train, model_cfg["arch"]["img_size"], model_cfg["eval_resize"], seed)
    trainer = _trainer(train)  # the world size is the trainer's, however `devices` is spelled
    values = identity.trajectory(params, name, trainer.world_size, identity.data_fingerprint(root))
    run = identity.run_id(values)
    steps = steps_per_epoch(
        len(data.train_set), train["batch_size"], trainer.world_size, train["accumulate_grad_batches"]
    )
    module = PretrainModule(model_cfg["arch"], train, steps, run, seed)
    trainer.fit_loop.epoch_loop.max_steps = module.total_steps
    run_dir = _run_dir(out, run, restart, trainer.is_global_zero)
    resume = find_resume_checkpoint(run_dir, run)  # every rank, read-only: no broadcast before fit
    plan = _plan(params, name, trainer, data, module, run, run_dir, resume)
    global_batch = plan["global_batch"]
    _callbacks(
        trainer, train, run_dir, global_batch, train_flops_per_image(module.model.cfg), plan["peak_flops_per_s"], resume
    )
    trainer.loggers = [TensorBoardLogger(save_dir=str(out / "tb"), name="", version=run, default_hp_metric=False)]
    if trainer.is_global_zero:
        _other_runs(out, run, values)
        _write_json(run_dir / "trajectory.json", values)
        _write_json(out / "run.json", plan)
        print(_summary(plan), flush=True)
    started = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if trainer.global_step % train["checkpoint_every_n_steps"] != 0 or trainer.global_step == 0:
        # the end state (same decision on every rank), so that extending epochs/max_steps continues from it
        trainer.save_checkpoint(run_dir / f"step-{trainer.global_step:06d}.ckpt")
    if trainer.is_global_zero:
        prune_checkpoints(run_dir, train["keep_last_checkpoints"], train["keep_every_n_steps"])
        _finish(params, name, out, module, trainer, plan, run_dir, time.time() - started)
    return out


def _callbacks(
    trainer: L.Trainer,
    train: dict[str, Any],
    run_dir: Path,
    global_batch: int,
    flops: float,
    peak: float | None,
    resume: Path | None,
) -> None:
    ckpt = RetainedCheckpoint(
        train["keep_last_checkpoints"],
        train["keep_every_n_steps"],
        dirpath=run_dir,
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=train["checkpoint_every_n_steps"],
        save_top_k=-1,
        save_last=False,
    )
    trainer.callbacks[:0] = [
        StepLog(run_dir / "log.csv", train["log_every_n_steps"], global_batch, flops, peak),
        ValLog(run_dir / "val.csv"),
        RankDigest(run_dir),
        _SameResumeOnEveryRank(resume),
    ]
    trainer.callbacks.append(ckpt)  # last: it saves after the other callbacks' end-of-batch work


def _finish(
    params: dict[str, Any],
    name: str,
    out: Path,
    module: PretrainModule,
    trainer: L.Trainer,
    plan: dict[str, Any],
    run_dir: Path,
    wall: float,
) -> None:
    digests = {p.name: p.read_text().strip() for p in run_dir.glob("rank-*.sha256")}
    model_cfg = params["models"][name]
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
        "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
    }  # the schedule's rate after the last step
    for log in ("log.csv", "val.csv"):  # this run's curves, where dvc plots finds them
        if (run_dir / log).exists():
            shutil.copyfile(run_dir / log, out / f"{log}.tmp")
            (out / f"{log}.tmp").replace(out / log)
    from xtra.reconstruct import write_model_reconstruction

    write_model_reconstruction(params, name, module.model, out)
    _write_json(out / "metrics.json", metrics)
    provenance = {k: metrics[k] for k in ("steps", "images_seen", "run_id", "final_loss")}
    save_model_artifact(
        out / ARTIFACT_NAME,
        init="pretrain",
        arch=model_cfg["arch"],
        state_dict=module.model.state_dict(),
        provenance={
            **provenance,
            "checkpoint": str(run_dir / f"step-{trainer.global_step:06d}.ckpt"),
            "resolved_arch": asdict(module.model.cfg),
        },
    )
    print(f"{name}: {metrics['steps']} steps, final loss {metrics['final_loss']}, wrote {out / ARTIFACT_NAME}")
