"""The Lightning side of pre-training, read top-down: the module (one step: data -> loss -> optimiser),
the data module that feeds it, and the callbacks that log, each named for what it does (those of the
resumable checkpoints: `xtra.train.checkpoints`).

One step (`PretrainModule.training_step`, per micro-batch): a batch of augmented images from the
data module (`xtra.data.streaming.ShardStream`), model randomness reseeded from (seed, rank, step,
micro-batch), the loss of next-block pixel prediction (`xtra.model.xtra.XTRA.loss`), a stop on a
non-finite loss; Lightning then accumulates, clips the gradient norm (`train.grad_clip`) and steps
AdamW at the rate of `release_warmup_cosine` (`xtra.train.schedule`).

The data (`PretrainData`), by `train.loader`:
- `stream` (default): `ShardStream` through a DataLoader: each worker opens each shard it needs at
  most once per epoch and reads it front to back; the order is a pure function of seed, epoch,
  world size and batch size (loader worker w yields batches w, w + K, ...; not a function of K);
- `random`: random access through the shard index (`xtra.data.prepared`): the order of epoch e is a
  seeded permutation of (seed, e), cut into one disjoint share per rank (`drop_last`: the remainder
  waits for a later epoch).
In both the position is one number, the batches of the current epoch already trained on (the data
module's `state_dict`, the same on every rank and for any `num_workers`), and a resumed run's
loader begins at the next batch (`ShardStream.start_at`, `EpochSampler.skip_batches`).
In both, sample i's augmentation in epoch e runs under `seeded(derive_seed(seed, "aug", e, i))`
(`xtra.data.rng`): the same whichever rank, worker or resume reads it.
"""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from xtra.data.prepared import EpochSampler, PreparedDataset, SeededView
from xtra.data.rng import derive_seed
from xtra.data.streaming import ShardStream, make_stream_loader
from xtra.data.transforms import eval_transform, pretrain_transform
from xtra.environment import add_segment, environment
from xtra.errors import XtraError
from xtra.model.arch import ArchConfig
from xtra.model.flops import peak_memory_mb
from xtra.model.xtra import XTRA, release_ordered_parameters
from xtra.train.config import TrainConfig
from xtra.train.schedule import decay_groups, release_warmup_cosine, schedule_steps

__all__ = [
    "NonFiniteLossError",
    "PretrainModule",
    "PretrainData",
    "LogSteps",
    "LogValidationLoss",
    "DigestRankWeights",
    "RebuildBucketsOnResume",
    "RecordEnvironments",
    "LOG_FIELDS",
    "VAL_FIELDS",
    "model_seed",
]

LOG_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "images_seen", "images_per_s", "step_time_s"]
LOG_FIELDS += ["peak_mem_mb", "mfu"]
VAL_FIELDS = ["step", "epoch", "val_loss"]


class NonFiniteLossError(XtraError):
    """The loss became NaN or Inf: training stops, the last good checkpoint is kept."""


def model_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """The seed of model randomness (stochastic depth) of (rank, optimiser step, micro-batch of the step)."""
    return derive_seed(seed, "model", rank, step, micro)


class PretrainModule(L.LightningModule):
    """XTRA pre-training: block-causal next-block pixel prediction with AdamW + the release's schedule.

    Model randomness (stochastic depth) is reseeded before every micro-batch from
    (seed, "model", global rank, optimiser step, micro-batch), so ranks draw different masks and a
    resumed run draws the same ones as an uninterrupted run.
    """

    def __init__(
        self,
        arch: dict[str, Any],
        train: TrainConfig,
        steps_per_epoch: int,
        run_id: str,
        seed: int = 0,
        segments: list[dict[str, int]] | None = None,
        last_loss: float | None = None,
    ) -> None:
        super().__init__()
        # plain data, never a pickled dataclass: a checkpoint names its arch, recipe and run
        hparams = {"arch": dict(arch), "train": train.as_dict(), "steps_per_epoch": steps_per_epoch}
        self.save_hyperparameters({**hparams, "run_id": run_id, "seed": seed})
        self.model = XTRA(ArchConfig.from_dict(arch))
        self.train_cfg, self.seed = train, seed
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps, self.total_steps = schedule_steps(train, steps_per_epoch)
        # the schedule segments of the run, the last one this one's ({start_step, epochs, max_steps,
        # total_steps}; each checkpoint records them with the step reached, `end_step`)
        self.segments = [dict(s) for s in segments or []]
        self.last_loss = last_loss  # the loss of the last training step (this rank), kept in the checkpoints
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None  # the rate the last optimiser step used

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch: model randomness reseeded, the next-block loss; a non-finite loss stops the run."""
        images, _ = batch  # (B, 3, S, S); labels are not used by pre-training
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(model_seed(self.seed, self.global_rank, self.global_step, micro))
        loss = self.model.loss(images, step=self.global_step)  # () mean over pixel heads and blocks
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

    def lr_at(self, step: int) -> float:
        cfg = self.train_cfg
        return release_warmup_cosine(step, cfg.lr, self.total_steps, self.warmup_steps, cfg.warmup_start_lr, cfg.min_lr)

    def configure_optimizers(self):
        cfg = self.train_cfg
        # the release's parameter order: a clipped step then equals the release's bit for bit
        groups = decay_groups(release_ordered_parameters(self.model), cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        # LambdaLR multiplies the base lr: express the absolute schedule as a factor of it.
        scheduler = LambdaLR(optimizer, lambda step: self.lr_at(step) / cfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        loss = self.model.loss(images, step=None)  # validation: the first block permutation
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def on_train_start(self) -> None:
        # a resumed run whose epochs/max_steps changed follows the new schedule from its first step on
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.lr_at(self.global_step)

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What the final files are made of besides the weights: the last loss, the schedule segments."""
        checkpoint["last_loss"] = self.last_loss
        ended = [{**self.segments[-1], "end_step": int(self.global_step)}] if self.segments else []
        checkpoint["segments"] = self.segments[:-1] + ended


class PretrainData(L.LightningDataModule):
    """The train loader (resumable; see the module doc) and, with `val_every_n_steps` > 0, the validation loader."""

    def __init__(self, root: Path, train: TrainConfig, img_size: int, eval_resize: int, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed, self.root = train, seed, Path(root)
        self.train_transform = pretrain_transform(img_size)
        self.train_set = PreparedDataset(self.root, "train", None)  # its size; the random loader's samples
        self.val_set = None
        if train.val_every_n_steps > 0:
            self.val_set = PreparedDataset(self.root, train.val_split, eval_transform(img_size, eval_resize))
        self.sampler: EpochSampler | None = None
        self.stream: ShardStream | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches done; -1: the epoch had ended)

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch: the stream's next iteration reads `epoch`."""
        if self.stream is not None:
            self.stream.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        trainer, cfg = self.trainer, self.cfg
        if cfg.loader == "stream":
            self.stream = ShardStream(
                self.root,
                "train",
                self.train_transform,
                seed=self.seed,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
            loader = make_stream_loader(self.stream, cfg.batch_size, cfg.num_workers, drop_last=True)
            # a run resumed from an epoch's last batch goes on with the next epoch (Lightning advances
            # its counter only later, after the loader's first iteration may have begun)
            epoch = trainer.current_epoch
            if self._resume is not None:
                epoch = self._resume[0] + 1 if self._resume[1] < 0 else self._resume[0]
                self.stream.start_at(self._resume[0], max(0, self._resume[1]))
            self.stream.set_epoch(epoch)
            return loader
        self.sampler = EpochSampler(
            self.train_set,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            seed=self.seed,
            drop_last=True,
            batch_size=cfg.batch_size,
        )
        self.sampler.set_epoch(trainer.current_epoch)
        if self._resume is not None and self._resume[1] > 0:
            self.sampler.skip_batches(*self._resume)
        return DataLoader(
            SeededView(self.train_set, None, self.train_transform, self.seed),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        trainer, cfg = self.trainer, self.cfg
        n = min(len(self.val_set), cfg.val_batches * cfg.batch_size * trainer.world_size)
        subset = torch.utils.data.Subset(self.val_set, range(n))  # the same fixed held-out images every time
        sampler = DistributedSampler(
            subset,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=False,
            drop_last=trainer.world_size > 1,
        )
        return DataLoader(subset, batch_size=cfg.batch_size, sampler=sampler, num_workers=0)

    def state_dict(self) -> dict[str, int]:
        """The loader position at a checkpoint: the epoch, the batches of it already trained on (a resumed
        loader begins after them) and whether that was the epoch's last batch."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        return {
            "epoch": int(self.trainer.current_epoch),
            "batches_done": int(progress.current.processed),
            "epoch_ended": bool(progress.is_last_batch),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), -1 if state.get("epoch_ended") else int(state["batches_done"]))


# ---------------------------------------------------------------- callbacks


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


class LogSteps(L.Callback):
    """Every `every` optimiser steps: a row of `log.csv` and the Lightning loggers' scalars (rank 0).

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
            "peak_mem_mb": peak_memory_mb(pl_module.device),
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


class LogValidationLoss(L.Callback):
    """Appends (step, epoch, val_loss) to `val.csv` after every validation (rank 0): `dvc plots` reads it."""

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
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "val_loss": f"{float(loss):.6f}"}
        _append_csv(self.path, VAL_FIELDS, row)


class DigestRankWeights(L.Callback):
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


class RebuildBucketsOnResume(L.Callback):
    """A process resumed under DDP all-reduces its first step's gradients as an uninterrupted run does.

    DDP's reducer all-reduces a process's first backward in its initial bucket layout (every gradient in
    one bucket, in the order the parameters were registered), then rebuilds its buckets once, in the order
    the gradients became ready. An uninterrupted run thus reduces step 1 in the initial layout and every
    later step in the rebuilt one, but a process resumed after step k reduced step k+1 in the initial
    layout. An all-reduce sums a flat bucket in chunks that depend on where each gradient lies in it (gloo's
    ring, NCCL's rings and trees), and a sum of three or more ranks' values depends on its order: from 3
    ranks on, that step's gradients, and so the run, differed in the low bits (issue 26; 2 ranks are exact,
    as a + b = b + a).

    So before the first batch of a process resumed at a step > 0, that batch's training step runs once
    through the DDP wrapper, forward and backward, and its gradients are dropped: the reducer records the
    ready order, all-reduces once and rebuilds its buckets at the next forward, so the real step reduces in
    the layout an uninterrupted run uses there. torch's generators are put back afterwards, so the real step
    draws what it would have drawn. Cost: one training step (forward, backward, gradient all-reduce) per
    resume, counted in the first logged step time; a run that starts at step 0 is untouched, so the
    numerics of an uninterrupted run do not change.
    """

    def __init__(self) -> None:
        self.first_batch = True  # of this process

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first, self.first_batch = self.first_batch, False
        ddp = trainer.strategy.model
        if not first or trainer.global_step == 0 or not isinstance(ddp, DistributedDataParallel):
            return
        device = trainer.strategy.root_device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device.index], device_type=device.type):
            for _ in range(2 if ddp.static_graph else 1):  # a static graph's first iteration only records it
                loss = trainer.strategy.training_step(batch, batch_idx)  # through DDP, in the precision's autocast
                loss.backward()
                pl_module.zero_grad(set_to_none=True)


class RecordEnvironments(L.Callback):
    """The environment of each segment of the run (`xtra.environment`): where it started and what it ran on.

    Kept in every checkpoint (`environments`), so a resumed run knows the segments before it; a
    resume in another environment (thread count, ranks, device, torch) adds a segment and says so in
    the log. The final files (model.pt provenance, metrics.json) copy the final checkpoint's list.
    """

    def __init__(self) -> None:
        self.segments: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = environment(trainer.world_size, trainer.strategy.root_device)
        self.segments, changed = add_segment(self.segments, "from_step", trainer.global_step, env)
        if changed and trainer.is_global_zero:
            print(
                f"note: resumed at step {trainer.global_step} in another environment than the run's last "
                f"segment ({'; '.join(changed)}): recorded as a segment of its own",
                flush=True,
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["environments"] = list(self.segments)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.segments = list(checkpoint.get("environments", []))
