"""The data of a probe job: splits, per-kind training transforms, seeded augmentation, loaders.

Augmentation is reproducible (the rule of `xtra.data.rng`): the training sampler yields `(epoch, i)`
pairs (`EpochTagged`), and `SeededView` runs the transform of sample i in epoch e under
`seeded(derive_seed(seed, "aug", e, i))`, i being the sample's index in the prepared split. The
draws then depend on neither the rank, the loader worker, nor a resume.

Training transforms by `probe.augmentation.<kind>` (when `probe.augment` is on):
- `randaugment`: timm's RandomResizedCrop + flip + RandAugment rand-m9-mstd0.5-inc1 + random
  erasing 0.25 (the release's attentive probes and its H/14 linear probe);
- `crop_flip`: RandomResizedCrop(S, scale 0.08-1, bicubic) + horizontal flip (the release's B/16
  linear probe);
- `none`: the evaluation transform (resize, centre crop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms as T

from xtra.data.readers.common import stratified_indices
from xtra.data.rng import derive_seed, seeded
from xtra.errors import ParamsError
from xtra.probe.config import ProbeConfig

__all__ = [
    "SeededView",
    "EpochTagged",
    "JobData",
    "build_data",
    "train_transform",
    "eval_loader",
    "train_loader",
]


class SeededView(Dataset):
    """Samples `indices` of a prepared split; item (epoch, j) is sample indices[j] transformed under its seed."""

    def __init__(self, base: Any, indices: Sequence[int] | None, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.base.targets)[self.indices]

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, int]:
        epoch, j = item if isinstance(item, tuple) else (0, item)
        i = self.indices[j]
        image = self.base.image(i)
        with seeded(derive_seed(self.seed, "aug", int(epoch), i)):
            x = self.transform(image)  # (3, S, S)
        return x, int(self.base.targets[i])


class EpochTagged(Sampler):
    """A DistributedSampler whose indices come tagged with the epoch: (epoch, i)."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.inner)


def train_transform(augmentation: str, img_size: int, eval_resize: int) -> Callable:
    from xtra.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, eval_transform, probe_train_transform

    if augmentation == "randaugment":
        return probe_train_transform(img_size)
    if augmentation == "crop_flip":
        return T.Compose(
            [
                T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(0.5),
                T.ToTensor(),
                T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
            ]
        )
    if augmentation == "none":
        return eval_transform(img_size, eval_resize)
    raise ParamsError(f"probe.augmentation: unknown augmentation {augmentation!r}")


@dataclass
class JobData:
    base: Any  # the prepared train split (PreparedDataset)
    train_idx: np.ndarray | None  # kept training samples (None: all)
    eval: Dataset
    heldout: Dataset | None
    num_classes: int
    manifest_sha256: str

    def train(self, augmentation: str, img_size: int, eval_resize: int, seed: int) -> SeededView:
        return SeededView(self.base, self.train_idx, train_transform(augmentation, img_size, eval_resize), seed)

    @property
    def num_train(self) -> int:
        return len(self.base) if self.train_idx is None else len(self.train_idx)


def build_data(cfg: ProbeConfig, prepared: Path, img_size: int) -> JobData:
    from xtra.data.prepared import PreparedDataset
    from xtra.data.transforms import eval_transform

    root = Path(prepared) / cfg.dataset
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
    sampler = EpochTagged(
        DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=drop_last)
    )
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
    from xtra.data.prepared import make_loader

    return make_loader(
        ds,
        cfg.batch_size,
        num_workers=cfg.num_workers,
        shuffle=False,
        seed=cfg.seed,
        rank=0,
        world_size=1,
        drop_last=False,
    )
