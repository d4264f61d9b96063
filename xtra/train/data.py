"""The pre-training data: a resumable, per-sample-seeded order over a prepared split.

`train.loader` chooses how the train split is read:
- `stream` (default): the data package's `ShardStream` through torchdata's `StatefulDataLoader`
  (each worker opens each of its shards once per epoch and reads it front to back; the order is a
  pure function of seed, epoch, world size, loader workers and batch size). Its position is the
  loader's `state_dict`, which Lightning stores in every checkpoint and restores on resume (the
  loader has a length, so Lightning does not prefetch past the checkpointed batch);
- `random`: random access through the shard index, described below.

Exact resume of `random` rests on three pure functions instead of saved generator states:
- the order of epoch e is a seeded permutation of (seed, e), cut into one disjoint share per rank
  (`torch.utils.data.DistributedSampler`, `drop_last=True`: the remainder of len % world_size samples
  is left out of that epoch, a different remainder every epoch);
- the augmentation of sample i in epoch e runs under `seeded(derive_seed(seed, "aug", e, i))`
  (`xtra.data.rng`), so it does not depend on the rank, the loader worker or a resume;
- model randomness is reseeded every micro-batch from (seed, rank, step) (`pretrain_module`).
The loader's position is then one number, the batches of the current epoch already trained on. It
is saved in every checkpoint (the data module's `state_dict`) and a resumed run's sampler skips
exactly those samples of that epoch: no batch is replayed or lost, whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from xtra.data.rng import derive_seed, seeded

__all__ = ["ResumableSampler", "SeededSamples", "PretrainData", "batches_per_epoch", "steps_per_epoch"]


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches each rank trains on per epoch (drop_last: the remainder samples wait for the next epoch)."""
    return (num_samples // world_size) // batch_size


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulate: int) -> int:
    """Optimiser steps per epoch, rounded up: Lightning steps on an epoch's last, partial accumulation."""
    batches = batches_per_epoch(num_samples, batch_size, world_size)
    return max(1, -(-batches // accumulate))


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that yields `(epoch, index)` and can skip the first batches of one epoch.

    `len()` stays the full share of the epoch, so Lightning's batch counters (restored from the
    checkpoint) line up with the batches that follow the skipped ones.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._skip: tuple[int, int] | None = None  # (epoch, batches to skip)

    def skip_batches(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches) if batches > 0 else None

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] * self.batch_size :]
            self._skip = None  # the next epoch starts at its beginning
        return iter([(self.epoch, i) for i in indices])


class SeededSamples(Dataset):
    """Item `(epoch, i)` -> `transform(image i)`, drawn under the per-sample seed of (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, i = item
        with seeded(derive_seed(self.seed, "aug", int(epoch), int(i))):
            return self.dataset[i]


class PretrainData(L.LightningDataModule):
    """Train loader (resumable) and, when `val_every_n_steps` > 0, the held-out validation loader."""

    def __init__(
        self,
        root: Path,
        train: dict[str, Any],
        img_size: int,
        eval_resize: int,
        seed: int,
        make_dataset: Callable[..., Dataset] | None = None,
    ) -> None:
        super().__init__()
        from xtra.data.prepared import PreparedDataset
        from xtra.data.transforms import eval_transform, pretrain_transform

        make = make_dataset or PreparedDataset
        self.cfg, self.seed, self.root = train, seed, Path(root)
        self.train_transform = pretrain_transform(img_size)
        self.train_set = make(Path(root), "train", self.train_transform)  # random access: its size, the random loader
        self.val_set = (
            make(Path(root), train["val_split"], eval_transform(img_size, eval_resize))
            if train["val_every_n_steps"] > 0
            else None
        )
        self.sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self.stream = None  # the ShardStream of the stream loader

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch: the stream's next iteration reads `epoch`."""
        if self.stream is not None:
            self.stream.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        trainer, cfg = self.trainer, self.cfg
        if cfg["loader"] == "stream":
            from xtra.data.streaming import ShardStream, make_stream_loader

            self.stream = ShardStream(
                self.root,
                "train",
                self.train_transform,
                seed=self.seed,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
            # a run resumed from an epoch's last batch goes on with the next epoch (Lightning advances
            # its counter only later, after the loader's first iteration may have begun)
            ended = self._resume is not None and self._resume[1] < 0
            self.stream.set_epoch(self._resume[0] + 1 if ended else trainer.current_epoch)
            return make_stream_loader(self.stream, cfg["batch_size"], cfg["num_workers"], drop_last=True)
        self.sampler = ResumableSampler(
            self.train_set,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            seed=self.seed,
            batch_size=cfg["batch_size"],
        )
        self.sampler.set_epoch(trainer.current_epoch)
        if self._resume is not None and self._resume[1] > 0:
            self.sampler.skip_batches(*self._resume)
        return DataLoader(
            SeededSamples(self.train_set, self.seed),
            batch_size=cfg["batch_size"],
            sampler=self.sampler,
            num_workers=cfg["num_workers"],
            drop_last=True,
            persistent_workers=cfg["num_workers"] > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        trainer, cfg = self.trainer, self.cfg
        n = min(len(self.val_set), cfg["val_batches"] * cfg["batch_size"] * trainer.world_size)
        subset = torch.utils.data.Subset(self.val_set, range(n))  # the same fixed held-out images every time
        sampler = DistributedSampler(
            subset,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=False,
            drop_last=trainer.world_size > 1,
        )
        return DataLoader(subset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=0)

    def state_dict(self) -> dict[str, int]:
        """The loader position at a checkpoint: the epoch, the batches of it already trained on (the random
        loader skips them on resume; the stream loader's position is its own state, saved by
        Lightning) and whether that was the epoch's last batch."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        return {
            "epoch": int(self.trainer.current_epoch),
            "batches_done": int(progress.current.processed),
            "epoch_ended": bool(progress.is_last_batch),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # (epoch, batches to skip); -1 batches: the epoch had ended
        self._resume = (int(state["epoch"]), -1 if state.get("epoch_ended") else int(state["batches_done"]))
