"""The data of a probe job: its splits (the held-out part of the `heldout` protocol), each training
transform's seeded view of the train split, and the loaders.

Random access to the prepared splits (`xtra.data.prepared`): the training loader's `EpochSampler`
yields `(epoch, i)` and `SeededView` runs sample i's transform of epoch e under its own seed, so
the augmentation depends on neither the rank, the loader worker, nor a resume. The training
transform of a kind is its `probe.kinds.<kind>.augmentation` when `probe.augment` is on, else the
evaluation transform (`xtra.data.transforms.probe_train_transform`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xtra.data.prepared import EpochSampler, PreparedDataset, SeededView, make_loader
from xtra.data.readers.common import stratified_indices
from xtra.data.transforms import eval_transform, probe_train_transform
from xtra.errors import ParamsError
from xtra.probe.config import ProbeConfig

__all__ = ["JobData", "build_data", "eval_loader", "train_loader"]


@dataclass
class JobData:
    """The splits of one job: the prepared train split (and the part kept for training), evaluation, held-out."""

    base: PreparedDataset  # the prepared train split, untransformed
    train_idx: np.ndarray | None  # kept training samples (None: all)
    eval: Dataset
    heldout: Dataset | None
    num_classes: int
    manifest_sha256: str

    def train(self, augmentation: str, img_size: int, eval_resize: int, seed: int) -> SeededView:
        """The training samples under the transform `augmentation`, seeded per (seed, epoch, sample)."""
        return SeededView(self.base, self.train_idx, probe_train_transform(augmentation, img_size, eval_resize), seed)

    @property
    def num_train(self) -> int:
        return len(self.base) if self.train_idx is None else len(self.train_idx)


def build_data(cfg: ProbeConfig, img_size: int) -> JobData:
    """The job's splits: `heldout` holds out a stratified part of the train split for selection."""
    root = cfg.prepared
    eval_tf = eval_transform(img_size, cfg.eval_resize)
    base = PreparedDataset(root, cfg.train_split, None)
    evaluation = PreparedDataset(root, cfg.eval_split, eval_tf)
    kept, heldout = None, None
    if cfg.protocol == "heldout":
        kept, held = stratified_indices(np.asarray(base.targets), cfg.heldout_fraction, cfg.seed)
        heldout = SeededView(base, held.tolist(), eval_tf, cfg.seed)
    return JobData(base, kept, evaluation, heldout, evaluation.num_classes, evaluation.manifest_sha256)


def train_loader(cfg: ProbeConfig, ds: Dataset, rank: int, world_size: int, drop_last: bool) -> DataLoader:
    """The shuffled training loader of this rank: 1/world of every global batch, tagged with the epoch."""
    if cfg.batch_size % world_size:
        raise ParamsError(
            f"probe.benchmarks.{cfg.benchmark}.batch_size: {cfg.batch_size} is not divisible by "
            f"its {world_size} devices"
        )
    sampler = EpochSampler(ds, num_replicas=world_size, rank=rank, seed=cfg.seed, drop_last=drop_last)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size // world_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )


def eval_loader(cfg: ProbeConfig, ds: Dataset) -> DataLoader:
    """The in-order loader of a whole split (evaluation, feature caching)."""
    return make_loader(ds, cfg.batch_size, num_workers=cfg.num_workers, shuffle=False, seed=cfg.seed, drop_last=False)
