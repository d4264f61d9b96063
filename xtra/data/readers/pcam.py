"""Reader of PatchCamelyon from its HDF5 files `pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`.

`x` is uint8 (N, 96, 96, 3), `y` is (N, 1, 1, 1). Labels are read at once; each image is read on
demand by an `H5Row` loader, which keeps one open file per process (safe to pickle to workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, array_key, dataset_root, find_layout, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_pcam", "H5Row"]

PCAM_SIZES = {"train": 262_144, "val": 32_768, "test": 32_768}
PCAM_SPLITS = {"train": "train", "val": "valid", "test": "test"}
_PREFIX = "camelyonpatch_level_2_split_"

# (process id, file path) -> open h5py.File; a forked worker opens its own.
_OPEN_FILES: dict[tuple[int, str], object] = {}


def _h5(path: str) -> object:
    import h5py

    key = (os.getpid(), path)
    if key not in _OPEN_FILES:
        _OPEN_FILES[key] = h5py.File(path, "r")
    return _OPEN_FILES[key]


@dataclass(frozen=True)
class H5Row:
    """Loads row `index` of dataset `name` of an HDF5 file as a PIL image."""

    path: str
    name: str
    index: int

    def __call__(self) -> Image.Image:
        return Image.fromarray(np.asarray(_h5(self.path)[self.name][self.index], dtype=np.uint8))


def _read_labels(path: Path) -> np.ndarray:
    import h5py

    require_file(path, "PatchCamelyon label file")
    try:
        with h5py.File(path, "r") as handle:
            return np.asarray(handle["y"][:]).reshape(-1).astype(np.int64)
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read dataset 'y' of {path}: {err}") from err


def _num_images(path: Path) -> int:
    import h5py

    require_file(path, "PatchCamelyon image file")
    try:
        with h5py.File(path, "r") as handle:
            shape = handle["x"].shape
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read dataset 'x' of {path}: {err}") from err
    if len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: dataset 'x' has shape {shape}, expected (N, 96, 96, 3)")
    return int(shape[0])


def _split_samples(base: Path, split: str, skipped: list[Skipped]) -> list[Sample]:
    x_path = base / f"{_PREFIX}{PCAM_SPLITS[split]}_x.h5"
    y_path = base / f"{_PREFIX}{PCAM_SPLITS[split]}_y.h5"
    labels = _read_labels(y_path)
    if _num_images(x_path) != len(labels):
        raise DataError(f"{x_path} and {y_path} hold different numbers of samples")
    samples: list[Sample] = []
    for index, label in enumerate(labels):
        if label in (0, 1):
            samples.append(Sample(array_key(split, index), H5Row(str(x_path), "x", index), int(label)))
        else:
            skipped.append((split, f"{y_path}[{index}]", f"label {label} out of range 0..1"))
    return samples


@register_reader("pcam", splits=tuple(PCAM_SIZES))
def read_pcam(params: dict) -> RawDataset:
    """PatchCamelyon -> `train` / `val` (the `valid` files) / `test` (root: folder holding `pcam/`, or it)."""
    root = dataset_root(params)
    base = find_layout(root, ["pcam", "."], [f"{_PREFIX}train_y.h5"], "pcam")
    skipped: list[Skipped] = []
    splits = {split: _split_samples(base, split, skipped) for split in PCAM_SPLITS}
    return RawDataset(
        classes=["normal", "tumor"],
        splits=splits,
        source=str(base),
        official_sizes=dict(PCAM_SIZES),
        skipped=skipped,
    )
