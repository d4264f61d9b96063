"""Reader of Stanford Cars (196 classes) from the devkit `.mat` files, read with scipy.

Layout (torchvision's root): `stanford_cars/{cars_train,cars_test}/NNNNN.jpg`,
`stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}` and the labelled test annotations
`stanford_cars/cars_test_annos_withlabels.mat`. `annotations` records carry `class` (1-based) and
`fname`; `cars_meta.mat["class_names"]` names the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, dataset_root, find_layout, listed_samples, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_cars", "load_mat"]

CARS_SIZES = {"train": 8_144, "test": 8_041}
# split -> (annotation file, image folder), relative to the dataset folder
CARS_SPLITS = {
    "train": ("devkit/cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}


def load_mat(path: Path, variable: str) -> np.ndarray:
    """One variable of a .mat file, squeezed and at least 1-D; a DataError naming file and variable."""
    from scipy.io import loadmat

    require_file(path, "Stanford Cars annotation file")
    try:
        content = loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if variable not in content:
        raise DataError(f"{path}: no variable {variable!r}")
    return np.atleast_1d(content[variable])


def _split_samples(base: Path, split: str, num_classes: int, skipped: list[Skipped]) -> list[Sample]:
    annos_name, image_dir = CARS_SPLITS[split]
    annotations = load_mat(base / annos_name, "annotations")
    names = annotations.dtype.names or ()
    if "class" not in names or "fname" not in names:
        raise DataError(f"{base / annos_name}: annotations lack the 'class'/'fname' fields (has {names})")
    entries = ((f"{image_dir}/{str(record['fname'])}", int(record["class"]) - 1) for record in annotations)
    return listed_samples(base, entries, num_classes, split, skipped)


@register_reader("cars", splits=tuple(CARS_SIZES))
def read_cars(params: dict) -> RawDataset:
    """Stanford Cars -> `train` / `test` (root: the folder holding `stanford_cars/`, or that folder)."""
    root = dataset_root(params)
    base = find_layout(root, ["stanford_cars", "."], ["devkit"], "cars")
    classes = [str(name) for name in load_mat(base / "devkit" / "cars_meta.mat", "class_names")]
    skipped: list[Skipped] = []
    splits = {split: _split_samples(base, split, len(classes), skipped) for split in CARS_SPLITS}
    return RawDataset(
        classes=classes, splits=splits, source=str(base), official_sizes=dict(CARS_SIZES), skipped=skipped
    )
