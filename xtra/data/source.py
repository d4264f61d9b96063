"""What a dataset reader returns: the samples of each split of a raw dataset, before preparation.

A reader (see `xtra.data.readers`) only *lists* samples; it opens no image. The preparation
stage (`xtra.data.prepare`) opens, checks, resizes and shards them, so a corrupt file is skipped
with its reason instead of killing the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Sample", "RawDataset", "ImageLoader", "Reader"]

# A sample's pixels: a file path, an in-memory array (H, W[, C]) uint8, or a callable that opens it.
ImageLoader = Path | np.ndarray | Callable[[], Image.Image]


@dataclass(frozen=True)
class Sample:
    """One labelled image of a split. `key` is unique within the dataset and stable across runs."""

    key: str
    image: ImageLoader
    label: int


@dataclass
class RawDataset:
    """The splits and class names of a raw dataset, as its official files define them."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    source: str
    # split -> the official size, checked by preparation when the whole dataset is present
    official_sizes: dict[str, int] = field(default_factory=dict)
    # samples the reader itself had to drop (missing file, label out of range): (split, source, reason);
    # entries of type xtra.data.readers.common.NotTaken are files under the root that are not samples
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


# A reader takes the dataset's params section (with `root`) and returns its RawDataset.
Reader = Callable[[dict], RawDataset]
