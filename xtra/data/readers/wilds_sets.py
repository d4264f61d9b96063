"""Readers of the WILDS image datasets (iWildCam, Camelyon17, RxRx1, fMoW) through the `wilds` package.

`wilds.get_dataset(..., download=False)` applies the official split rules (Camelyon17 by centre,
fMoW by year, RxRx1 id_test = train-site 2) offline when `<root>/<name>_v<version>/RELEASE_v<version>.txt`
exists. Only its split, label and file-name arrays are used here; no image is opened.
wilds 2.0.0 needs pandas<3 (RxRx1 writes into a read-only array under pandas 3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, dataset_root, make_key, require_file
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = [
    "read_iwildcam",
    "read_camelyon17",
    "read_rxrx1",
    "read_fmow",
    "WILDS_VERSIONS",
    "wilds_data_dir",
    "import_wilds",
]

WILDS_VERSIONS = {"iwildcam": "2.0", "camelyon17": "1.0", "rxrx1": "1.0", "fmow": "1.1"}
WILDS_SIZES = {
    "iwildcam": {"train": 129_809, "val": 14_961, "test": 42_791, "id_val": 7_314, "id_test": 8_154},
    "camelyon17": {"train": 302_436, "id_val": 33_560, "val": 34_904, "test": 85_054},
    "rxrx1": {"train": 40_612, "val": 9_854, "test": 34_432, "id_test": 40_612},
    "fmow": {"train": 76_863, "id_val": 11_483, "id_test": 11_327, "val": 19_915, "test": 22_108},
}

# (wilds dataset, index) -> image path relative to the dataset folder
RelPath = Callable[[Any, int], str]


def import_wilds() -> ModuleType:
    """The `wilds` package, imported without its PyPI version check.

    On import, wilds starts a non-daemon thread that asks PyPI for its latest version through
    `outdated` (requests without a timeout); on a compute node whose traffic is dropped, that thread
    can keep the process from exiting. Hiding `outdated` during the import makes wilds skip it.
    """
    if "wilds" in sys.modules or "outdated" in sys.modules:
        import wilds

        return wilds
    sys.modules["outdated"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import wilds
    finally:
        del sys.modules["outdated"]
    return wilds


def wilds_data_dir(root: Path, name: str) -> Path:
    """`<root>/<name>_v<ver>` (root may also be that folder itself); a DataError naming the release file."""
    folder, release = f"{name}_v{WILDS_VERSIONS[name]}", f"RELEASE_v{WILDS_VERSIONS[name]}.txt"
    if (root / folder / release).is_file():
        return root / folder
    if root.name == folder and (root / release).is_file():
        return root
    raise DataError(
        f"{name}: missing {root / folder / release} (the WILDS layout: root holds {folder}/ with {release}, "
        f"metadata and images as unpacked from the WILDS archive)"
    )


def _load(name: str, data_dir: Path) -> Any:
    """The wilds dataset object; its own errors become a DataError naming the folder."""
    get_dataset = import_wilds().get_dataset
    try:
        return get_dataset(name, version=WILDS_VERSIONS[name], root_dir=str(data_dir.parent), download=False)
    except (OSError, KeyError, ValueError, TypeError, AssertionError, IndexError) as err:
        raise DataError(
            f"{name}: wilds could not read {data_dir} ({type(err).__name__}: {err}); "
            "check metadata columns, contiguous ids and pandas<3"
        ) from err


def _splits(dataset: Any, data_dir: Path, relpath: RelPath, skipped: list[Skipped]) -> dict[str, list[Sample]]:
    """The samples of each wilds split (train and val always, the others when not empty)."""
    split_array = np.asarray(dataset.split_array)
    labels = np.asarray(dataset.y_array)
    splits: dict[str, list[Sample]] = {}
    for split, split_id in dataset.split_dict.items():
        indices = np.flatnonzero(split_array == split_id)
        if len(indices) == 0 and split not in ("train", "val"):
            continue
        samples: list[Sample] = []
        for index in indices:
            rel = relpath(dataset, int(index))
            path = data_dir / rel
            if path.is_file():
                samples.append(Sample(key=make_key(rel), image=path, label=int(labels[index])))
            else:
                skipped.append((split, str(path), "image listed in the metadata is missing"))
        splits[split] = samples
    return splits


def _read(params: dict, name: str, relpath: RelPath, classes: Callable[[Path, Any], list[str]]) -> RawDataset:
    data_dir = wilds_data_dir(dataset_root(params), name)
    dataset = _load(name, data_dir)
    names = classes(data_dir, dataset)
    skipped: list[Skipped] = []
    splits = _splits(dataset, data_dir, relpath, skipped)
    return RawDataset(
        classes=names, splits=splits, source=str(data_dir), official_sizes=dict(WILDS_SIZES[name]), skipped=skipped
    )


def _read_csv(path: Path, columns: list[str]) -> Any:
    import pandas as pd

    require_file(path, "WILDS metadata file")
    try:
        return pd.read_csv(path, usecols=columns)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read columns {columns} of {path}: {err}") from err


def _names_by_id(frame: Any, id_column: str, name_column: str, count: int, source: Path) -> list[str]:
    """Names of ids 0..count-1 from two columns of a table (rows without an id are ignored)."""
    rows = frame.dropna(subset=[id_column]).drop_duplicates(subset=[id_column, name_column])
    names: dict[int, str] = {}
    for class_id, name in zip(rows[id_column].astype(int), rows[name_column].astype(str)):
        if names.setdefault(class_id, name) != name:
            raise DataError(f"{source}: {id_column} {class_id} names both {names[class_id]!r} and {name!r}")
    missing = [i for i in range(count) if i not in names]
    if missing:
        raise DataError(f"{source}: no {name_column} for {id_column} {missing[:5]}")
    return [names[i] for i in range(count)]


def _iwildcam_classes(data_dir: Path, dataset: Any) -> list[str]:
    path = data_dir / "categories.csv"
    return _names_by_id(_read_csv(path, ["y", "name"]), "y", "name", int(dataset.n_classes), path)


def _rxrx1_classes(data_dir: Path, dataset: Any) -> list[str]:
    path = data_dir / "metadata.csv"
    return _names_by_id(_read_csv(path, ["sirna_id", "sirna"]), "sirna_id", "sirna", int(dataset.n_classes), path)


def _fmow_classes(data_dir: Path, dataset: Any) -> list[str]:
    import_wilds()
    from wilds.datasets.fmow_dataset import categories

    return list(categories)


@register_reader("iwildcam", splits=tuple(WILDS_SIZES["iwildcam"]))
def read_iwildcam(params: dict) -> RawDataset:
    """iWildCam (WILDS v2.0, 182 classes) -> `train` / `val` (OOD) / `test` / `id_val` / `id_test`."""
    return _read(params, "iwildcam", lambda d, i: f"train/{d._input_array[i]}", _iwildcam_classes)


@register_reader("camelyon17", splits=tuple(WILDS_SIZES["camelyon17"]))
def read_camelyon17(params: dict) -> RawDataset:
    """Camelyon17 (WILDS v1.0): `train`, `id_val`, `val` (OOD, centre 1), `test` (centre 2)."""
    return _read(params, "camelyon17", lambda d, i: str(d._input_array[i]), lambda p, d: ["normal", "tumor"])


@register_reader("rxrx1", splits=tuple(WILDS_SIZES["rxrx1"]))
def read_rxrx1(params: dict) -> RawDataset:
    """RxRx1 (WILDS v1.0, 1,139 siRNAs) -> `train` / `val` / `test` / `id_test`."""
    return _read(params, "rxrx1", lambda d, i: str(d._input_array[i]).replace("\\", "/"), _rxrx1_classes)


@register_reader("fmow", splits=tuple(WILDS_SIZES["fmow"]))
def read_fmow(params: dict) -> RawDataset:
    """fMoW (WILDS v1.1, 62 classes) -> `train` / `id_val` / `id_test` / `val` / `test`."""
    return _read(params, "fmow", lambda d, i: f"images/rgb_img_{int(d.full_idxs[i])}.png", _fmow_classes)
