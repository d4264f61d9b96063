"""Reader of the Oxford-IIIT Pet dataset (37 breeds).

Layout: `oxford-iiit-pet/images/<Name>_<n>.jpg` and `oxford-iiit-pet/annotations/{trainval,test}.txt`
with lines `Image CLASS-ID SPECIES BREED-ID` (CLASS-ID 1..37). The label is CLASS-ID - 1; class names
come from the image names, title-cased, as torchvision's `OxfordIIITPet` makes them
(`american_bulldog` -> `American Bulldog`). Official `trainval` is our `train`.
"""

from __future__ import annotations

from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import (
    Skipped,
    classes_from_ids,
    dataset_root,
    find_layout,
    listed_samples,
    read_lines,
)
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_pets", "breed_name"]

PETS_SIZES = {"train": 3_680, "test": 3_669}
PETS_FILES = {"train": "trainval.txt", "test": "test.txt"}


def breed_name(image_id: str) -> str:
    """`american_bulldog_12` -> `American Bulldog` (torchvision's class name)."""
    return " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))


def _parse(path: Path) -> list[tuple[str, int]]:
    """(image id, 0-based label) of each line of an annotation file."""
    rows: list[tuple[str, int]] = []
    for line in read_lines(path, "Oxford-IIIT Pet split file"):
        fields = line.split()
        try:
            rows.append((fields[0], int(fields[1]) - 1))
        except (IndexError, ValueError) as err:
            raise DataError(f"{path}: malformed line {line!r} ({err})") from err
    return rows


def _split_samples(
    base: Path, rows: list[tuple[str, int]], num_classes: int, split: str, skipped: list[Skipped]
) -> list[Sample]:
    entries = ((f"images/{image_id}.jpg", label) for image_id, label in rows)
    return listed_samples(base, entries, num_classes, split, skipped)


@register_reader("pets", splits=tuple(PETS_SIZES))
def read_pets(params: dict) -> RawDataset:
    """Oxford-IIIT Pet -> `train` (trainval.txt) / `test` (test.txt)."""
    root = dataset_root(params)
    base = find_layout(root, ["oxford-iiit-pet", "."], ["annotations", "images"], "pets")
    rows = {split: _parse(base / "annotations" / name) for split, name in PETS_FILES.items()}
    pairs = [(label, breed_name(i)) for split_rows in rows.values() for i, label in split_rows if label >= 0]
    classes = classes_from_ids(pairs, str(base / "annotations"))
    skipped: list[Skipped] = []
    splits = {split: _split_samples(base, r, len(classes), split, skipped) for split, r in rows.items()}
    return RawDataset(
        classes=classes, splits=splits, source=str(base), official_sizes=dict(PETS_SIZES), skipped=skipped
    )
