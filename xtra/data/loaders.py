"""Map-style datasets over prepared shards, and the DataLoader factory of training and probing.

`PreparedDataset(root, split, transform)` reads `root/manifest.json` (written by `xtra prepare`),
indexes the split's shards once (see `xtra.data.shards`) and returns `(transform(image), label)`.

`make_loader` always uses a `DistributedSampler` (one replica when not distributed): the order is a
function of (seed, epoch) only, each rank gets a disjoint 1/world_size of it, and Lightning keeps
a sampler that is already a DistributedSampler and calls its `set_epoch` every epoch. With
`drop_last=False` and a dataset size not divisible by world_size, DistributedSampler pads by
repeating a few samples (PyTorch's behaviour); evaluation that must count each sample once should
use world_size 1 or `drop_last=False` with an exact size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from xtra.data.decode import decode_rgb
from xtra.data.shards import MANIFEST, ShardReader, index_shards
from xtra.errors import DataError

__all__ = ["MANIFEST", "load_manifest", "PreparedDataset", "make_loader", "dist_rank_world"]

SUPPORTED_VERSIONS = (1, 2, 3)


def load_manifest(root: Path) -> dict:
    """The manifest of a prepared dataset folder; a DataError naming the dataset when it is absent."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"prepared dataset {root.name!r} not found: {path} is missing (run `xtra prepare {root.name}`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != "webdataset" or manifest.get("version") not in SUPPORTED_VERSIONS:
        raise DataError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not supported; "
            f"prepare {root.name!r} again with --force"
        )
    return manifest


class PreparedDataset(Dataset):
    """One split of a prepared dataset: item i -> (transform(RGB PIL image), label)."""

    def __init__(self, root: Path, split: str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.name: str = self.manifest.get("dataset", self.root.name)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(
                f"prepared dataset {self.name!r} ({self.root}) has no split {split!r}; "
                f"its splits: {', '.join(sorted(splits)) or 'none'}"
            )
        self.split = split
        self.transform = transform
        self.classes: list[str] = list(self.manifest["classes"])
        self.num_classes: int = int(self.manifest["num_classes"])
        self._reader = ShardReader(index_shards(self.root, splits[split]["shards"]))
        self.targets: np.ndarray = self._reader.index.label  # (N,) int64
        self.manifest_sha256 = hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()

    def __len__(self) -> int:
        return len(self._reader.index)

    def key(self, i: int) -> str:
        """The member key of sample i (for messages)."""
        return self._reader.index.key(i)

    def image(self, i: int) -> Image.Image:
        """Sample i's stored image, decoded to RGB."""
        index = self._reader.index
        return decode_rgb(self._reader.read(i), lambda: f"{index.files[int(index.shard[i])]}: sample {self.key(i)!r}")

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} ({len(self)} samples)")
        img = self.image(i)
        x = self.transform(img) if self.transform is not None else img  # (3, S, S) with a transform
        return x, int(self.targets[i])

    def __repr__(self) -> str:
        return f"PreparedDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `ds` with a seeded DistributedSampler at `epoch` (see the module doc).

    rank / world_size default to the initialised process group (else 0 / 1). Augmentation
    randomness in workers comes from a generator seeded with (seed, rank), so it is reproducible.
    """
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(rank))
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
