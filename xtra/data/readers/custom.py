"""Reader of a user's class-folder dataset: `<root>/train/<class>/*`, `<root>/val/<class>/*`, optional `test/`.

Classes are the sorted class folders of `train/`; a class folder of `val/` or `test/` missing from
`train/` is an error, an empty class folder is recorded in `skipped`, files without an image
extension are ignored.
"""

from __future__ import annotations

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, class_folders, dataset_root, is_image, list_class_tree, require_dir
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_custom"]


@register_reader("custom")
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
    splits: dict[str, list[Sample]] = {}
    for split, folder in folders.items():
        splits[split] = list_class_tree(folder, classes, root, split, skipped)
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_image(path.name):
                skipped.append((split, str(path), "image outside a class folder"))
    return RawDataset(classes=classes, splits=splits, source=str(root), skipped=skipped)
