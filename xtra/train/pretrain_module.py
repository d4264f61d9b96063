"""The Lightning side of pre-training: the module, its optimiser and schedule, and the step log."""

from __future__ import annotations

import csv
import hashlib
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from xtra.data.rng import derive_seed
from xtra.errors import XtraError
from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA
from xtra.release.convert import release_ordered_parameters
from xtra.train.schedule import decay_groups, release_warmup_cosine

__all__ = [
    "NonFiniteLossError",
    "PretrainModule",
    "StepLog",
    "ValLog",
    "RankDigest",
    "LOG_FIELDS",
    "VAL_FIELDS",
    "schedule_steps",
    "model_seed",
]

LOG_FIELDS = [
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "images_seen",
    "images_per_s",
    "step_time_s",
    "peak_mem_mb",
    "mfu",
]
VAL_FIELDS = ["step", "epoch", "val_loss"]


class NonFiniteLossError(XtraError):
    """The loss became NaN or Inf: training stops, the last good checkpoint is kept."""


def schedule_steps(train: dict[str, Any], steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, total optimiser steps) of a run: epochs x steps per epoch, capped by max_steps."""
    total = train["epochs"] * steps_per_epoch
    if train["max_steps"] >= 0:
        total = min(total, train["max_steps"])
    return int(round(train["warmup_epochs"] * steps_per_epoch)), total


def model_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """Contract interface 5: the seed of model randomness of (rank, optimiser step, micro-batch of the step)."""
    return derive_seed(seed, "model", rank, step, micro)


class PretrainModule(L.LightningModule):
    """XTRA pre-training: block-causal next-block pixel prediction with AdamW + the release's schedule.

    Model randomness (stochastic depth) is reseeded before every micro-batch from
    (seed, "model", global rank, optimiser step, micro-batch), so ranks draw different masks and a
    resumed run draws the same ones as an uninterrupted run.
    """

    def __init__(
        self, arch: dict[str, Any], train: dict[str, Any], steps_per_epoch: int, run_id: str, seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = XTRA(ArchConfig.from_dict(arch))
        self.train_cfg, self.seed = train, seed
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps, self.total_steps = schedule_steps(train, steps_per_epoch)
        self.last_loss: float | None = None  # the loss of the last training step (this rank)
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None  # the rate the last optimiser step used

    def lr_at(self, step: int) -> float:
        cfg = self.train_cfg
        return release_warmup_cosine(
            step, cfg["lr"], self.total_steps, self.warmup_steps, cfg["warmup_start_lr"], cfg["min_lr"]
        )

    def configure_optimizers(self):
        cfg = self.train_cfg
        # the release's parameter order: a clipped step then equals the release's bit for bit
        groups = decay_groups(release_ordered_parameters(self.model), cfg["weight_decay"])
        optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        # LambdaLR multiplies the base lr: express the absolute schedule as a factor of it.
        scheduler = LambdaLR(optimizer, lambda step: self.lr_at(step) / cfg["lr"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # a resumed run whose epochs/max_steps changed follows the new schedule from its first step on
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.lr_at(self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of an epoch's last batch holds the loader state of an exhausted epoch: drop it, so
        that the next epoch starts at its beginning instead of resuming the finished one (as an
        uninterrupted run does). Mid-epoch checkpoints keep theirs."""
        fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        if (fit.get("epoch_loop.batch_progress") or {}).get("is_last_batch") and "state_dict" in fit:
            fit["state_dict"].pop("combined_loader", None)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def _reseed(self, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(model_seed(self.seed, self.global_rank, self.global_step, micro))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch  # (B, 3, S, S); labels are not used by pre-training
        self._reseed(batch_idx)
        loss = self.model.loss(images, step=self.global_step)
        finite = bool(torch.isfinite(loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}); "
                "training stopped, the last good checkpoint is kept"
            )
        self.last_loss = float(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.last_lr = float(optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.last_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0  # before clipping

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        loss = self.model.loss(images, step=None)  # validation: the first block permutation
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _truncate_csv(path: Path, fields: list[str], last_step: int) -> None:
    """Keep only the rows up to `last_step` (a resumed run re-logs what follows), in `fields`' columns."""
    rows = []
    if path.exists():
        with path.open(newline="") as handle:
            rows = [{k: r.get(k, "") for k in fields} for r in csv.DictReader(handle) if int(r["step"]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _append_csv(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=fields).writerow(row)


class StepLog(L.Callback):
    """Every `every` optimiser steps: a CSV row and the Lightning loggers' scalars (rank 0).

    Loss, the lr the step used, grad-norm (before clipping), images/s and step time over the last interval, peak
    memory, and on CUDA the model-FLOPs utilisation `flops_per_image x images/s / (world x peak)`.
    On a resumed run, rows after the resumed step are dropped first: no gap and no duplicate step.
    """

    def __init__(
        self, path: Path, every: int, global_batch: int, flops_per_image: float = 0.0, peak_flops: float | None = None
    ) -> None:
        self.path, self.every, self.global_batch = Path(path), every, global_batch
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self._last_logged = -1
        self._mark: tuple[int, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = (trainer.global_step, time.perf_counter())
        if trainer.is_global_zero:
            _truncate_csv(self.path, LOG_FIELDS, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimiser steps done, after this batch
        if not trainer.is_global_zero or step == 0 or step % self.every != 0 or step == self._last_logged:
            return
        self._last_logged = step  # with gradient accumulation several batches share one step
        now = time.perf_counter()
        start_step, start = self._mark or (step - 1, now)
        self._mark = (step, now)
        step_time = (now - start) / max(1, step - start_step)
        images_per_s = self.global_batch / step_time if step_time > 0 else 0.0
        mfu = self.flops_per_image * images_per_s / (trainer.world_size * self.peak_flops) if self.peak_flops else None
        values = {
            "loss": pl_module.last_loss,
            "lr": pl_module.last_lr,
            "grad_norm": pl_module.last_grad_norm,
            "images_per_s": images_per_s,
            "step_time_s": step_time,
            "peak_mem_mb": _peak_mem_mb(pl_module.device),
            "mfu": mfu,
        }
        row = {
            "step": step,
            "epoch": trainer.current_epoch,
            "images_seen": step * self.global_batch,
            **{k: ("" if v is None else f"{v:.8g}") for k, v in values.items()},
        }
        _append_csv(self.path, LOG_FIELDS, row)
        for logger in trainer.loggers:
            logger.log_metrics({f"train/{k}": float(v) for k, v in values.items() if v is not None}, step=step)


class ValLog(L.Callback):
    """Appends (step, epoch, val_loss) to a CSV after every validation (rank 0): `dvc plots` reads it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            _truncate_csv(self.path, VAL_FIELDS, trainer.global_step)
            with self.path.open(newline="") as handle:
                self._last_step = max((int(r["step"]) for r in csv.DictReader(handle)), default=-1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")  # the epoch value, reduced over ranks
        if trainer.sanity_checking or loss is None or not trainer.is_global_zero:
            return
        if trainer.global_step == self._last_step:  # a resumed run may validate its resumed step again
            return
        self._last_step = trainer.global_step
        _append_csv(
            self.path,
            VAL_FIELDS,
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "val_loss": f"{float(loss):.6f}"},
        )


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
