"""Readers of CIFAR-10 and CIFAR-100 from the official Python pickles (no MD5 check, no torchvision).

Each batch holds `data` uint8 (N, 3072), the R, G then B planes of a 32x32 image, row-major.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, array_key, dataset_root, find_layout, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_cifar10", "read_cifar100", "load_pickle", "batch_images"]

CIFAR_SIZES = {"train": 50_000, "test": 10_000}
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_BATCHES = {"train": ["train"], "test": ["test"]}


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2, so latin1); a DataError naming the file when unreadable."""
    require_file(path, "CIFAR file")
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"cannot read CIFAR file {path}: {err}") from err
    if not isinstance(content, dict):
        raise DataError(f"CIFAR file {path} does not hold a dict")
    return content


def batch_images(batch: dict, path: Path) -> np.ndarray:
    """The (N, 32, 32, 3) uint8 images of a batch."""
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR file {path}: 'data' has shape {data.shape}, expected (N, 3072)")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_split(
    folder: Path, files: Sequence[str], label_field: str, split: str, num_classes: int, skipped: list[Skipped]
) -> list[Sample]:
    samples: list[Sample] = []
    index = 0  # position in the split over all its batch files: the key
    for name in files:
        batch = load_pickle(folder / name)
        images = batch_images(batch, folder / name)
        labels = batch.get(label_field)
        if labels is None or len(labels) != len(images):
            raise DataError(f"CIFAR file {folder / name}: '{label_field}' missing or not one per image")
        for row, (image, label) in enumerate(zip(images, labels)):
            if 0 <= int(label) < num_classes:
                samples.append(Sample(key=array_key(split, index), image=image, label=int(label)))
            else:
                skipped.append((split, f"{folder / name}[{row}]", f"label {label} out of range"))
            index += 1
    return samples


def _read_cifar(
    params: dict, folder_name: str, meta: tuple[str, str], batches: dict[str, list[str]], label_field: str
) -> RawDataset:
    root = dataset_root(params)
    folder = find_layout(root, [folder_name, "."], [meta[0]], params.get("kind", "cifar"))
    names = load_pickle(folder / meta[0]).get(meta[1])
    if not names:
        raise DataError(f"CIFAR file {folder / meta[0]}: no '{meta[1]}'")
    classes = [str(n) for n in names]
    skipped: list[Skipped] = []
    splits = {
        split: _read_split(folder, files, label_field, split, len(classes), skipped) for split, files in batches.items()
    }
    return RawDataset(
        classes=classes, splits=splits, source=str(folder), official_sizes=dict(CIFAR_SIZES), skipped=skipped
    )


@register_reader("cifar10", splits=tuple(CIFAR_SIZES))
def read_cifar10(params: dict) -> RawDataset:
    """CIFAR-10: `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` -> `train` / `test`."""
    return _read_cifar(params, "cifar-10-batches-py", ("batches.meta", "label_names"), CIFAR10_BATCHES, "labels")


@register_reader("cifar100", splits=tuple(CIFAR_SIZES))
def read_cifar100(params: dict) -> RawDataset:
    """CIFAR-100 (fine labels): `cifar-100-python/{train,test,meta}` -> `train` / `test`."""
    return _read_cifar(params, "cifar-100-python", ("meta", "fine_label_names"), CIFAR100_BATCHES, "fine_labels")
