"""Reader of the Describable Textures Dataset (DTD) with its official partitions.

Layout (torchvision's root): `<root>/dtd/dtd/images/<class>/<class>_NNNN.jpg` and
`<root>/dtd/dtd/labels/{train,val,test}<partition>.txt` (lines `banded/banded_0002.jpg`).
The root may also point at the inner `dtd/dtd` folder (or the tarball's `dtd/`). The class order is
the sorted class names of the split files, as in torchvision. XTRA trains on train+val.
"""

from __future__ import annotations

from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, dataset_root, find_layout, listed_samples, read_lines
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_dtd"]

DTD_SIZES = {"train": 3_760, "test": 1_880}
# our split -> the official split files merged into it
DTD_SPLITS = {"train": ("train", "val"), "test": ("test",)}


def _partition(params: dict) -> int:
    value = params.get("partition", 1)
    if not isinstance(value, int) or not 1 <= value <= 10:
        raise DataError(f"dtd: partition must be an integer 1..10, got {value!r}")
    return value


def _split_samples(
    base: Path, entries: list[str], classes: list[str], split: str, skipped: list[Skipped]
) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    labelled = ((entry, index[entry.split("/")[0]]) for entry in entries)
    return listed_samples(base / "images", labelled, len(classes), split, skipped)


@register_reader("dtd", splits=tuple(DTD_SIZES))
def read_dtd(params: dict) -> RawDataset:
    """DTD partition `params["partition"]` (1..10) -> `train` (train+val files) / `test`."""
    root = dataset_root(params)
    base = find_layout(root, ["dtd/dtd", "dtd", "."], ["images", "labels"], "dtd")
    partition = _partition(params)
    files = {name: base / "labels" / f"{name}{partition}.txt" for name in ("train", "val", "test")}
    lines = {name: read_lines(path, "DTD split file") for name, path in files.items()}
    entries = {split: [e for name in names for e in lines[name]] for split, names in DTD_SPLITS.items()}
    classes = sorted({e.split("/")[0] for split_entries in entries.values() for e in split_entries})
    skipped: list[Skipped] = []
    splits = {split: _split_samples(base, items, classes, split, skipped) for split, items in entries.items()}
    return RawDataset(classes=classes, splits=splits, source=str(base), official_sizes=dict(DTD_SIZES), skipped=skipped)
