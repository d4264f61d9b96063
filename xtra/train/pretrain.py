"""`xtra pretrain MODEL`: pre-train (or initialise, or convert) one model of params.yaml.

Outputs in `<paths.models>/<model>/`:
- `checkpoints/step-NNNNNN.ckpt` every `checkpoint_every_n_steps` and `checkpoints/last.ckpt`, used to
  resume automatically when the same command is run again after an interruption;
- `last.ckpt`: the final model, written atomically once training has finished (what probing reads);
- `log.csv` (step, epoch, loss, lr, images_seen), `metrics.json`, `reconstruction.png`.
A run whose training params changed since the saved checkpoints starts afresh instead of resuming.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xtra.atomic import write_json_atomic
from xtra.config import load_params, params_hash
from xtra.errors import CheckpointError, ParamsError, writing_to
from xtra.model.checkpoint import read_checkpoint, save_model_checkpoint, save_torch_atomic
from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA
from xtra.train.pretrain_module import PretrainModule, RankDigest, StepLog

# the files that exist only once the stage has finished (last.ckpt is written last)
FINAL_FILES = ("last.ckpt", "metrics.json")

__all__ = ["configure_parser", "run", "pretrain_model", "training_hash", "find_resume_checkpoint"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a key of `models` in params.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    pretrain_model(params, args.model)
    return 0


def training_hash(params: dict[str, Any], name: str) -> str:
    """What a checkpoint must match to be resumed: the arch, the training recipe, data and seed."""
    model = params["models"][name]
    return params_hash({"arch": model["arch"], "train": {k: v for k, v in model["train"].items()
                                                          if k not in ("num_workers", "log_every_n_steps")},
                        "dataset": model["dataset"], "data": params["datasets"].get(model["dataset"] or ""),
                        "seed": params["seed"]})


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def pretrain_model(params: dict[str, Any], name: str) -> Path:
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
            return _train(params, name, out)
        except BaseException:
            # a failed run leaves no half-written final checkpoint, log or figure behind (not in a finally:
            # under DDP the other ranks return while rank 0 still writes last.ckpt.tmp)
            for leftover in ("last.ckpt.tmp", "log.csv.tmp", "reconstruction.tmp.png"):
                (out / leftover).unlink(missing_ok=True)
            if model_cfg["init"] != "pretrain":  # nothing to resume: no final file without the other
                for final in FINAL_FILES:
                    (out / final).unlink(missing_ok=True)
            raise


def _write_random(params: dict[str, Any], name: str, out: Path) -> Path:
    """The random-init control: the encoder as initialised with the run's seed, never trained."""
    arch = params["models"][name]["arch"]
    L.seed_everything(params["seed"], verbose=False)
    model = XTRA(ArchConfig.from_dict(arch))
    _write_json(out / "metrics.json", {"init": "random", "steps": 0, "images_seen": 0, "seed": params["seed"]})
    from xtra.reconstruct import write_model_reconstruction

    write_model_reconstruction(params, name, model, out)  # the control is drawn like the others
    save_model_checkpoint(model, out / "last.ckpt", arch)  # last: its presence means the stage finished
    print(f"{name}: wrote the random-init control to {out / 'last.ckpt'}")
    return out


def _write_official(params: dict[str, Any], name: str, out: Path) -> Path:
    from xtra.model.convert import convert_official

    model_cfg = params["models"][name]
    report = convert_official(model_cfg["checkpoint"], out / "last.ckpt", model_cfg["arch"])
    _write_json(out / "metrics.json", {"init": "official", "source": model_cfg["checkpoint"], **report})
    return out


def find_resume_checkpoint(ckpt_dir: Path, expected_hash: str) -> Path | None:
    """The newest readable checkpoint of this exact training setup, or None.

    A checkpoint written while the process was killed can be truncated: then the previous one is used.
    Checkpoints of other params are removed, so a changed recipe starts afresh.
    """
    if not ckpt_dir.is_dir():
        return None
    candidates = [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("step-*.ckpt"), reverse=True)
    for path in candidates:
        if not path.exists():
            continue
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as exc:
            print(f"warning: skipping unreadable checkpoint {path}: {exc}")
            continue
        if (ckpt.get("hyper_parameters") or {}).get("params_hash") != expected_hash:
            print(f"params changed since {path} was written: starting afresh")
            shutil.rmtree(ckpt_dir)
            return None
        return path
    return None


def _data_module(params: dict[str, Any], name: str) -> tuple[L.LightningDataModule, int]:
    from xtra.data.loaders import PreparedDataset, make_loader
    from xtra.data.transforms import pretrain_transform

    model_cfg = params["models"][name]
    train, arch = model_cfg["train"], model_cfg["arch"]
    root = Path(params["paths"]["prepared"]) / model_cfg["dataset"]
    dataset = PreparedDataset(root, "train", pretrain_transform(arch["img_size"]))
    world = train["num_nodes"] * (train["devices"] if isinstance(train["devices"], int) else 1)
    steps_per_epoch = max(1, len(dataset) // (train["batch_size"] * world) // train["accumulate_grad_batches"])

    class _Data(L.LightningDataModule):
        def train_dataloader(self):
            trainer = self.trainer
            return make_loader(dataset, train["batch_size"], train["num_workers"], shuffle=True,
                               seed=params["seed"], epoch=trainer.current_epoch, rank=trainer.global_rank,
                               world_size=trainer.world_size, drop_last=True)

    return _Data(), steps_per_epoch


class _SameFolderCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint through a temporary file beside it, then a rename.

    Lightning's own save copies a temporary file from $TMPDIR over the final name: a full disk then
    leaves a truncated `step-*.ckpt`, and $TMPDIR needs a whole checkpoint's space free.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # refuses them, with Lightning's message
            return
        save_torch_atomic(checkpoint, path)


def _trainer(train: dict[str, Any], out: Path, global_batch: int, total_steps: int) -> L.Trainer:
    callbacks = [
        ModelCheckpoint(dirpath=out / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=train["checkpoint_every_n_steps"], save_top_k=-1, save_last=True),
        StepLog(out / "log.csv", train["log_every_n_steps"], global_batch),
        RankDigest(out / "checkpoints"),
        TQDMProgressBar(refresh_rate=max(1, train["log_every_n_steps"])),
    ]
    return L.Trainer(
        accelerator=train["accelerator"], devices=train["devices"], num_nodes=train["num_nodes"],
        strategy=train["strategy"], precision=train["precision"], max_epochs=train["epochs"],
        max_steps=total_steps, gradient_clip_val=train["grad_clip"] or None,
        accumulate_grad_batches=train["accumulate_grad_batches"], callbacks=callbacks, logger=False,
        use_distributed_sampler=False, enable_model_summary=False, default_root_dir=str(out),
        num_sanity_val_steps=0, log_every_n_steps=train["log_every_n_steps"], plugins=[_SameFolderCheckpointIO()],
    )


def _train(params: dict[str, Any], name: str, out: Path) -> Path:
    model_cfg = params["models"][name]
    train = model_cfg["train"]
    L.seed_everything(params["seed"], workers=True, verbose=False)
    data, steps_per_epoch = _data_module(params, name)
    expected = training_hash(params, name)
    module = PretrainModule(model_cfg["arch"], train, steps_per_epoch, expected)
    world = train["num_nodes"] * (train["devices"] if isinstance(train["devices"], int) else 1)
    global_batch = train["batch_size"] * world * train["accumulate_grad_batches"]
    trainer = _trainer(train, out, global_batch, module.total_steps)
    if trainer.is_global_zero:  # temporary files of a save that was killed
        for stale in (out / "checkpoints").glob(".*.tmp"):
            stale.unlink()
    resume = find_resume_checkpoint(out / "checkpoints", expected) if trainer.is_global_zero else None
    resume = trainer.strategy.broadcast(str(resume) if resume else None)
    if resume:
        print(f"{name}: resuming from {resume}")
    elif trainer.is_global_zero and (out / "log.csv").exists():
        (out / "log.csv").unlink()
    started = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    final = out / "last.ckpt"
    tmp = out / "last.ckpt.tmp"
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        _finish(params, name, out, module, trainer, global_batch, time.time() - started)
        tmp.replace(final)  # last: a run that failed before this point leaves no last.ckpt
    return out


def _finish(params: dict[str, Any], name: str, out: Path, module: PretrainModule, trainer: L.Trainer,
            global_batch: int, wall: float) -> None:
    digests = {p.name: p.read_text().strip() for p in (out / "checkpoints").glob("rank-*.sha256")}
    metrics = {"init": "pretrain", "steps": trainer.global_step, "epochs": trainer.current_epoch,
               "images_seen": trainer.global_step * global_batch, "global_batch": global_batch,
               "final_loss": module.last_loss, "wall_time_s": round(wall, 2),
               "world_size": trainer.world_size, "ranks_in_sync": len(set(digests.values())) <= 1,
               "params_hash": training_hash(params, name)}
    from xtra.reconstruct import write_model_reconstruction

    write_model_reconstruction(params, name, module.model, out)
    _write_json(out / "metrics.json", metrics)
    print(f"{name}: {metrics['steps']} steps, final loss {metrics['final_loss']}, wrote {out}")
