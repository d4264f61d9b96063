"""Reader of Food-101: `food-101/images/<class>/<id>.jpg` with the split lists `food-101/meta/{train,test}.json`.

Each split file maps a class to its entries `"<class>/<id>"` (no extension). The class order is
the sorted class names of the split files, as torchvision's `Food101` has it.
"""

from __future__ import annotations

import json
from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, dataset_root, find_layout, listed_samples, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_food101"]

FOOD101_SIZES = {"train": 75_750, "test": 25_250}


def _load_split(path: Path) -> dict[str, list[str]]:
    require_file(path, "Food-101 split file")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read Food-101 split file {path}: {err}") from err
    if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
        raise DataError(f"Food-101 split file {path} is not a {{class: [entries]}} mapping")
    return content


def _split_samples(
    base: Path, lists: dict[str, list[str]], classes: list[str], split: str, skipped: list[Skipped]
) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    entries = ((f"images/{entry}.jpg", index[name]) for name in sorted(lists) for entry in lists[name])
    return listed_samples(base, entries, len(classes), split, skipped)


@register_reader("food101", splits=tuple(FOOD101_SIZES))
def read_food101(params: dict) -> RawDataset:
    """Food-101 -> `train` / `test` (root: the folder holding `food-101/`, or `food-101/` itself)."""
    root = dataset_root(params)
    base = find_layout(root, ["food-101", "."], ["meta", "images"], "food101")
    lists = {split: _load_split(base / "meta" / f"{split}.json") for split in ("train", "test")}
    classes = sorted(set(lists["train"]) | set(lists["test"]))
    skipped: list[Skipped] = []
    splits = {split: _split_samples(base, content, classes, split, skipped) for split, content in lists.items()}
    return RawDataset(
        classes=classes, splits=splits, source=str(base), official_sizes=dict(FOOD101_SIZES), skipped=skipped
    )
