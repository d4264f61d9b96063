"""Reader of EuroSAT RGB: `eurosat/2750/<Class>/<Class>_<n>.jpg` (ImageFolder, sorted classes).

EuroSAT has no official split. With `split_lists` (a folder holding torchgeo's
`eurosat-{train,val,test}.txt`, one file name per line) those lists define the splits; without it,
a stratified split seeded by `split_seed` keeps the same 60/20/20 proportions (16,200/5,400/5,400).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import (
    Skipped,
    class_folders,
    dataset_root,
    find_layout,
    list_class_tree,
    read_lines,
    stratified_indices,
)
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_eurosat"]

EUROSAT_SIZES = {"train": 16_200, "val": 5_400, "test": 5_400}
EUROSAT_SPLITS = ("train", "val", "test")


def _stem(name: str) -> str:
    """`Forest_1399.jpg` -> `Forest_1399` (torchgeo's lists name .jpg or .tif files)."""
    return Path(name).stem


def _from_lists(samples: list[Sample], folder: Path, skipped: list[Skipped]) -> dict[str, list[Sample]]:
    by_stem = {_stem(Path(str(s.image)).name): s for s in samples}
    splits: dict[str, list[Sample]] = {}
    for split in EUROSAT_SPLITS:
        path = folder / f"eurosat-{split}.txt"
        splits[split] = []
        for name in read_lines(path, "EuroSAT split list"):
            sample = by_stem.get(_stem(name))
            if sample is None:
                skipped.append((split, name, f"listed in {path.name} but no such image"))
            else:
                splits[split].append(sample)
    return splits


def _seeded(samples: list[Sample], seed: int) -> dict[str, list[Sample]]:
    labels = np.array([s.label for s in samples])
    train, held = stratified_indices(labels, 0.4, seed)
    val_pos, test_pos = stratified_indices(labels[held], 0.5, seed)
    parts = {"train": train, "val": held[val_pos], "test": held[test_pos]}
    return {split: [samples[i] for i in indices] for split, indices in parts.items()}


@register_reader("eurosat", splits=EUROSAT_SPLITS)
def read_eurosat(params: dict) -> RawDataset:
    """EuroSAT RGB -> `train` / `val` / `test` (root: the folder holding `eurosat/`, or `eurosat/`)."""
    root = dataset_root(params)
    base = find_layout(root, ["eurosat/2750", "2750"], ["."], "eurosat")
    classes = class_folders(base)
    if not classes:
        raise DataError(f"eurosat: {base} holds no class folders")
    skipped: list[Skipped] = []
    samples = list_class_tree(base, classes, base, "all", skipped)
    lists = params.get("split_lists")
    if lists:
        splits = _from_lists(samples, Path(str(lists)).expanduser(), skipped)
    else:
        splits = _seeded(samples, int(params.get("split_seed", 0)))
    return RawDataset(
        classes=classes, splits=splits, source=str(base), official_sizes=dict(EUROSAT_SIZES), skipped=skipped
    )
