"""The Lightning side of pre-training: the module, its optimiser and schedule, and the step log."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from xtra.errors import XtraError
from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA
from xtra.train.schedule import decay_groups, warmup_cosine

__all__ = ["NonFiniteLossError", "PretrainModule", "StepLog", "RankDigest", "LOG_FIELDS"]

LOG_FIELDS = ["step", "epoch", "loss", "lr", "images_seen"]


class NonFiniteLossError(XtraError):
    """The loss became NaN or Inf: training stops, the last good checkpoint is kept."""


class PretrainModule(L.LightningModule):
    """XTRA pre-training: block-causal next-block pixel prediction with AdamW + warm-up/cosine."""

    def __init__(self, arch: dict[str, Any], train: dict[str, Any], steps_per_epoch: int, params_hash: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = XTRA(ArchConfig.from_dict(arch))
        self.train_cfg = train
        self.steps_per_epoch = steps_per_epoch
        self.last_loss: float | None = None  # the loss of the last training step (this rank)

    @property
    def total_steps(self) -> int:
        epochs_steps = self.train_cfg["epochs"] * self.steps_per_epoch
        max_steps = self.train_cfg["max_steps"]
        return min(epochs_steps, max_steps) if max_steps >= 0 else epochs_steps

    def lr_at(self, step: int) -> float:
        cfg = self.train_cfg
        warmup = int(round(cfg["warmup_epochs"] * self.steps_per_epoch))
        return warmup_cosine(step, cfg["lr"], self.total_steps, warmup, cfg["warmup_start_lr"], cfg["min_lr"])

    def configure_optimizers(self):
        cfg = self.train_cfg
        optimizer = torch.optim.AdamW(decay_groups(self.model, cfg["weight_decay"]), lr=cfg["lr"],
                                      betas=tuple(cfg["betas"]))
        # LambdaLR multiplies the base lr: express the absolute schedule as a factor of it.
        scheduler = LambdaLR(optimizer, lambda step: self.lr_at(step) / cfg["lr"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch  # (B, 3, S, S); labels are not used by pre-training
        loss = self.model.loss(images, step=self.global_step)
        finite = bool(torch.isfinite(loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}); "
                "training stopped, the last good checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        self.last_loss = float(loss.detach())
        return loss


class StepLog(L.Callback):
    """Appends (step, epoch, loss, lr, images_seen) to a CSV every `every` optimiser steps.

    On a resumed run, rows after the resumed step are dropped first, so the log has no gap and no
    duplicate step whatever the moment of interruption.
    """

    def __init__(self, path: Path, every: int, global_batch: int) -> None:
        self.path, self.every, self.global_batch = Path(path), every, global_batch
        self._last_logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= trainer.global_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimiser steps done, after this batch
        if not trainer.is_global_zero or step % self.every != 0 or step == self._last_logged:
            return
        self._last_logged = step  # with gradient accumulation several batches share one step
        loss = trainer.callback_metrics["train/loss"]
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_FIELDS).writerow(
                {"step": step, "epoch": trainer.current_epoch, "loss": f"{float(loss):.6f}", "lr": f"{lr:.8g}",
                 "images_seen": step * self.global_batch})


class RankDigest(L.Callback):
    """At the end of training each rank writes the sha256 of its weights: DDP ranks must agree."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank-{trainer.global_rank}.sha256").write_text(digest.hexdigest() + "\n")
