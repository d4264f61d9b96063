"""Random access to a prepared dataset: its manifest, a map-style dataset over its shards, the
decoding of a stored image, and the DataLoader factory of evaluation and probing.

`load_manifest(root)` reads `root/manifest.json` (written by `xtra prepare`) and checks its format.
`PreparedDataset(root, split, transform)` indexes the split's shards once (see `xtra.data.shards`)
and returns `(transform(image), label)`. Pre-training streams the same shards instead
(`xtra.data.streaming`); both decode through `decode_rgb`, so they give the same pixels.

Decoding: PIL, not torchvision.io, on the hot path. Measured here (CPU time of one thread, 2,000
stored JPEGs of shorter side 256 cut from real photos, Pillow 13.0 with libjpeg-turbo 3.2,
torchvision 0.29.1): PIL open + load 733 images/s, `torchvision.io.decode_jpeg` 755, `decode_image`
748, and `decode_jpeg` followed by the conversion to the PIL image the transforms take 627. The
pixels are identical (both are libjpeg-turbo; max difference 0 over 200 images), so the 3 % faster
decode is lost to the conversion; a tensor-only transform pipeline would be faster (308 against 209
images/s for the whole pre-training transform) but gives different pixels than the PIL bicubic
resize every published pipeline uses.

Training over random access (probe heads; pre-training with `train.loader: random`) draws its
augmentation the way the stream does (`xtra.data.rng`): `EpochSampler` yields `(epoch, i)` pairs and
`SeededView` transforms sample i of epoch e under `seeded(derive_seed(seed, "aug", e, i))`, i being
the sample's index in the prepared split, so the draws depend on neither the rank, the loader worker
nor a resume. `EpochSampler.skip_batches` resumes an epoch after the batches already trained on.

`make_loader` always uses a `DistributedSampler` (one replica by default): the order is a function
of (seed, epoch) only, each rank gets a disjoint 1/world_size of it. With `drop_last=False` and a
dataset size not divisible by world_size, DistributedSampler pads by repeating a few samples
(PyTorch's behaviour); evaluation that must count each sample once uses world_size 1.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from xtra.atomic import sha256_file
from xtra.data.images import DECODE_ERRORS
from xtra.data.rng import derive_seed, seeded
from xtra.data.shards import MANIFEST, ShardReader, index_shards
from xtra.errors import DataError

__all__ = ["MANIFEST", "load_manifest", "decode_rgb", "PreparedDataset", "SeededView", "EpochSampler", "make_loader"]

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


def decode_rgb(data: bytes, where: Callable[[], str]) -> Image.Image:
    """The stored image `data` as an RGB PIL image; a DataError naming `where()` (shard, sample) when it is bad.

    `where` is called only on an error, so naming the sample (a tar header read) costs nothing per sample.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except DECODE_ERRORS as exc:
        raise DataError(f"{where()} cannot be decoded: {exc}") from exc


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
        self.manifest_sha256 = sha256_file(self.root / MANIFEST)

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


class SeededView(Dataset):
    """Samples `indices` (None: all) of a prepared split; item (epoch, j) is sample indices[j] transformed
    under its seed of (seed, epoch, sample); a plain j reads epoch 0."""

    def __init__(self, base: PreparedDataset, indices: Sequence[int] | None, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.base.targets)[self.indices]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, j = item if isinstance(item, tuple) else (0, item)
        i = self.indices[j]
        image = self.base.image(i)
        with seeded(derive_seed(self.seed, "aug", int(epoch), i)):
            x = self.transform(image)  # (3, S, S)
        return x, int(self.base.targets[i])


class EpochSampler(DistributedSampler):
    """A shuffling DistributedSampler that yields `(epoch, index)` and can skip the first batches of one epoch.

    `len()` stays the full share of the epoch, so Lightning's batch counters (restored from a
    checkpoint) line up with the batches that follow the skipped ones.
    """

    def __init__(
        self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, drop_last: bool, batch_size: int = 1
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
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


def make_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `ds` with a seeded DistributedSampler at `epoch` (see the module doc).

    Augmentation randomness in workers comes from a generator seeded with (seed, rank), so it is reproducible.
    """
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
