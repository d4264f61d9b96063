"""Reader of iNaturalist 2018 from its COCO-style split files (the official 437,513 / 24,426 protocol).

torchvision's `INaturalist(version="2018")` indexes every image folder instead (train and val
merged, labels from folder ids), so the lists are built here from `train2018.json` / `val2018.json`:
`images[].file_name` is relative to the root, labels are `annotations[].category_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, classes_from_ids, dataset_root, listed_sample, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_inat2018"]

INAT2018_SIZES = {"train": 437_513, "val": 24_426}
SPLIT_FILES = {"train": "train2018.json", "val": "val2018.json"}


def _load_json(path: Path) -> dict:
    require_file(path, "iNaturalist split file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read iNaturalist split file {path}: {err}") from err


def _categories(root: Path, split_json: dict, source: Path) -> list[str]:
    """Class names by category id; from the separate `categories.json` (real taxa) when present."""
    names_file = root / "categories.json"
    if names_file.is_file():
        categories, source = _load_json(names_file), names_file
    else:
        categories = split_json.get("categories")
    if not isinstance(categories, list):
        raise DataError(f"{source}: no 'categories' list")
    try:
        return classes_from_ids(((int(c["id"]), str(c["name"])) for c in categories), str(source))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{source}: malformed category entry ({err})") from err


def _split_samples(
    root: Path, data: dict, path: Path, split: str, num_classes: int, skipped: list[Skipped]
) -> list[Sample]:
    """The samples of one split file: each image with the category of its annotation."""
    try:
        labels = {int(a["image_id"]): int(a["category_id"]) for a in data["annotations"]}
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed images/annotations ({err})") from err
    samples: list[Sample] = []
    for image_id, file_name in images:
        if image_id not in labels:
            skipped.append((split, file_name, f"image id {image_id} has no annotation in {path.name}"))
            continue
        sample = listed_sample(root, file_name, labels[image_id], num_classes, split, skipped)
        if sample is not None:
            samples.append(sample)
    return samples


@register_reader("inat2018", splits=tuple(INAT2018_SIZES))
def read_inat2018(params: dict) -> RawDataset:
    """iNaturalist 2018: `train2018.json`, `val2018.json` and `train_val2018/` -> `train` / `val`."""
    root = dataset_root(params)
    loaded = {split: _load_json(root / name) for split, name in SPLIT_FILES.items()}
    classes = _categories(root, loaded["train"], root / SPLIT_FILES["train"])
    skipped: list[Skipped] = []
    splits = {
        split: _split_samples(root, data, root / SPLIT_FILES[split], split, len(classes), skipped)
        for split, data in loaded.items()
    }
    return RawDataset(
        classes=classes, splits=splits, source=str(root), official_sizes=dict(INAT2018_SIZES), skipped=skipped
    )
