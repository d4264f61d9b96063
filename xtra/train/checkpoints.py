"""The resumable checkpoints of a pre-training run: `models/<model>/checkpoints/<run id>/step-NNNNNN.ckpt`.

Saved through a temporary file beside the target and a rename (`SameFolderCheckpointIO`), every
`checkpoint_every_n_steps` optimiser steps, the newest `keep_last_checkpoints` kept (and every
`keep_every_n_steps`-th: `KeepCheckpoints`), and at the first optimiser step after the scheduler's
warning signal (`xtra.timelimit`: the ranks agree, all save, the run ends for the front-end to resubmit
it); found again on resume by every rank itself (`find_resume_checkpoint`, read-only), the ranks
checked to have chosen the same file once the process group exists (`CheckSameResumeOnEveryRank`).
Each attempt of the run is recorded in `attempts.json` beside them. They are no stage output: `model.pt` is.

Lightning's own handling of Slurm's signal is off (`cluster_plugins`: SLURMEnvironment with
`auto_requeue=False`): it would save elsewhere and requeue the job itself, behind the front-end's back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xtra.atomic import save_torch_atomic
from xtra.errors import CheckpointError
from xtra.timelimit import AttemptLog, StopForResubmission, catch_stop_signals, seconds_since_stop_signal, stop_signal

__all__ = [
    "find_resume_checkpoint",
    "prune_checkpoints",
    "KeepCheckpoints",
    "CheckSameResumeOnEveryRank",
    "SameFolderCheckpointIO",
    "cluster_plugins",
]


def find_resume_checkpoint(run_dir: Path, expected_run: str) -> Path | None:
    """The newest readable checkpoint of this run, or None. Read-only: every rank calls it itself.

    A file that cannot be read (a truncated or foreign one) is skipped with a warning; nothing is
    deleted. A checkpoint naming another run is an error (it was copied into the wrong folder).
    Only the small part of each checkpoint that decides this is read (it is memory-mapped).
    """
    if not run_dir.is_dir():
        return None
    for path in sorted(run_dir.glob("step-*.ckpt"), reverse=True):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, with its reason
            print(f"warning: skipping unreadable checkpoint {path}: cannot be read (truncated?): {exc}")
            continue
        if not isinstance(ckpt, dict) or "global_step" not in ckpt:
            print(f"warning: skipping unreadable checkpoint {path}: not a Lightning checkpoint")
            continue
        found = (ckpt.get("hyper_parameters") or {}).get("run_id")
        if found != expected_run:
            raise CheckpointError(f"{path} belongs to run {found!r}, not {expected_run!r} (its folder)")
        return path
    return None


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


class KeepCheckpoints(ModelCheckpoint):
    """Saves `step-NNNNNN.ckpt` every `every_n_train_steps`, keeping the newest `keep_last` (and every
    `keep_every`-th step); after a stop signal, at the next optimiser step, saves it and stops the run.

    The stop: after every optimiser step the ranks agree whether any of them got a stop signal (one
    all-reduce of a flag); if so every rank takes part in saving that step (unless the periodic save just
    did), rank 0 records the attempt's end in `attempts` and every rank raises StopForResubmission. The
    attempt's record begins once the process group exists, so that every rank read the previous
    records first (`AttemptLog.check_progress`, before fit)."""

    def __init__(self, keep_last: int, keep_every: int, attempts: AttemptLog, start: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.attempts, self.start = attempts, start
        self._checked_step = -1  # the last optimiser step the stop flag was agreed on

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            self.attempts.begin(self.start, world_size=trainer.world_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        catch_stop_signals()  # fit put Lightning's SIGTERM handler in place, which stops without saving

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            prune_checkpoints(Path(filepath).parent, self.keep_last, self.keep_every)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the periodic save
        step = trainer.global_step
        if step == self._checked_step or step >= trainer.fit_loop.epoch_loop.max_steps:
            return  # within an accumulation group, or the last step: the run finishes anyway
        self._checked_step = step
        received = stop_signal()
        if not trainer.strategy.reduce_boolean_decision(received is not None, all=False):
            return
        path = Path(self.dirpath) / f"step-{step:06d}.ckpt"
        started = time.monotonic()
        if self._last_global_step_saved != step:
            self._save_checkpoint(trainer, str(path))
        saved_in = time.monotonic() - started
        waited = seconds_since_stop_signal()
        how = f"{received} {waited:.1f} s before" if received else "another rank's stop signal"
        if trainer.is_global_zero:
            self.attempts.end("stopped", step, signal=received or "another rank's", lost=0, save_s=round(saved_in, 3))
        raise StopForResubmission(
            f"{how}: saved step {step} to {path} in {saved_in:.2f} s (steps lost: 0; this attempt trained steps "
            f"{self.start}-{step})"
        )


class CheckSameResumeOnEveryRank(L.Callback):
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


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint through a temporary file beside it, then a rename; loads it memory-mapped.

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


def cluster_plugins() -> list[SLURMEnvironment]:
    """Inside a Slurm job: its environment with Lightning's requeue off (see the module doc); else none."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
