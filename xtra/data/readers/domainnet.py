"""Reader of DomainNet Infograph from the official split lists.

Layout: `<root>/infograph/<class>/infograph_<CCC>_<NNNNNN>.jpg` plus `<root>/infograph_{train,test}.txt`,
lines `infograph/<class>/<file>.jpg <label>`. Label ids and class order come from these files
(the official order is not `sorted()`: `cello` 66 before `cell_phone` 67); a class's name is the
folder of its files.
"""

from __future__ import annotations

from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, classes_from_ids, dataset_root, listed_samples, read_lines
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_infograph", "read_domain"]

INFOGRAPH_SIZES = {"train": 36_023, "test": 15_582}


def _parse(path: Path) -> list[tuple[str, int]]:
    """(relative path, label) of each line of a split list."""
    rows: list[tuple[str, int]] = []
    for line in read_lines(path, "DomainNet split list"):
        try:
            relpath, label = line.rsplit(maxsplit=1)
            rows.append((relpath, int(label)))
        except ValueError as err:
            raise DataError(f"{path}: malformed line {line!r} (expected '<relpath> <label>')") from err
    return rows


def _class_of(relpath: str, path: Path) -> str:
    parts = relpath.split("/")
    if len(parts) < 3:
        raise DataError(f"{path}: {relpath!r} is not <domain>/<class>/<file>")
    return parts[-2]


def read_domain(params: dict, domain: str, sizes: dict[str, int]) -> RawDataset:
    """One DomainNet domain -> `train` / `test` from `<domain>_{train,test}.txt` beside `<domain>/`."""
    root = dataset_root(params)
    files = {split: root / f"{domain}_{split}.txt" for split in ("train", "test")}
    rows = {split: _parse(path) for split, path in files.items()}
    pairs = [(label, _class_of(rel, files[s])) for s, split_rows in rows.items() for rel, label in split_rows]
    classes = classes_from_ids([p for p in pairs if p[0] >= 0], f"{files['train']} / {files['test']}")
    skipped: list[Skipped] = []
    splits: dict[str, list[Sample]] = {}
    for split, split_rows in rows.items():
        splits[split] = listed_samples(root, split_rows, len(classes), split, skipped)
    return RawDataset(classes=classes, splits=splits, source=str(root), official_sizes=dict(sizes), skipped=skipped)


@register_reader("infograph", splits=tuple(INFOGRAPH_SIZES))
def read_infograph(params: dict) -> RawDataset:
    """DomainNet Infograph (345 classes) -> `train` / `test`."""
    return read_domain(params, "infograph", INFOGRAPH_SIZES)
