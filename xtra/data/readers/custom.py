"""Reader of a user's class-folder dataset: `<root>/train/<class>/*`, `<root>/val/<class>/*`, optional `test/`.

Classes are the sorted class folders of `train/`; a class folder of `val/` or `test/` missing from
`train/` is an error. Every file under the root is accounted for: the images of the class folders
(any format Pillow decodes, links followed as `xtra.data.readers.common.list_class_tree` says) are
the samples; everything else (hidden files, files that are not images, files outside a class folder
or outside the split folders, link loops, links out of a class folder, empty class folders) is
listed as NotTaken with its reason. Keys are the relative paths from the root, made unique.
"""

from __future__ import annotations

import os
from pathlib import Path

from xtra.data.readers import register_reader
from xtra.data.readers.common import (
    NotTaken,
    Skipped,
    class_folders,
    dataset_root,
    list_class_tree,
    require_dir,
)
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_custom", "custom_splits"]


def _loose_entries(folder: Path, split: str, keep: set[str], where: str, skipped: list[Skipped]) -> None:
    """Record every entry of `folder` but those named in `keep` as NotTaken (hidden, loop, or `where`).

    `split` is "-" for the entries of the root itself."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name in keep:
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link loop
            skipped.append(NotTaken(split, entry.path, f"link loop (-> {os.readlink(entry.path)})"))
            continue
        if entry.name.startswith("."):
            reason = "hidden folder (its files are not read)" if is_dir else "hidden file"
        elif entry.is_symlink() and not os.path.exists(entry.path):
            reason = f"dangling link (-> {os.readlink(entry.path)}, missing)"
        else:
            reason = f"folder {where} (its files are not read)" if is_dir else f"file {where}"
        skipped.append(NotTaken(split, entry.path, reason))


def custom_splits(params: dict) -> tuple[str, ...]:
    """`train` and `val`, and `test` when the tree has a `test/` folder."""
    root = Path(str(params.get("root") or "")).expanduser()
    return ("train", "val", "test") if (root / "test").is_dir() else ("train", "val")


@register_reader("custom", splits=custom_splits)
def read_custom(params: dict) -> RawDataset:
    """A class-folder tree -> `train` / `val` (and `test` when present)."""
    root = dataset_root(params)
    folders = {"train": root / "train", "val": root / "val"}
    for split, folder in folders.items():
        require_dir(folder, f"custom dataset split folder ({split}/<class>/...)")
    if (root / "test").is_dir():
        folders["test"] = root / "test"
    classes = class_folders(folders["train"])
    if not classes:
        raise DataError(f"custom: {folders['train']} holds no class folders")
    skipped: list[Skipped] = []
    _loose_entries(root, "-", set(folders), "outside the split folders train/, val/, test/", skipped)
    taken: dict[str, str] = {}  # real path -> the path listed: a file linked from two splits is listed once
    splits: dict[str, list[Sample]] = {}
    for split, folder in folders.items():
        splits[split] = list_class_tree(folder, classes, root, split, skipped, taken)
        _loose_entries(folder, split, set(class_folders(folder)), "outside a class folder", skipped)
    return RawDataset(classes=classes, splits=splits, source=str(root), skipped=skipped)
