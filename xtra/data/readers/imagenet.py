"""Readers of ImageNet-1k and ImageNet-21k(-P) laid out as ImageFolder trees of wnid folders.

Classes are the sorted wnids of the training tree (torchvision ImageFolder / ImageNet order). A
`meta.bin` beside the trees (torchvision's parsed devkit) is not needed and not read: the class
list stays the wnids, as in every SSL code base that probes on ImageNet.
"""

from __future__ import annotations

from pathlib import Path

from xtra.data.readers.common import Skipped, class_folders, dataset_root, is_image, list_class_tree
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_imagenet1k", "read_imagenet21k", "read_image_folders"]

IMAGENET1K_SIZES = {"train": 1_281_167, "val": 50_000}
# ImageNet-21K-P (Alibaba-MIIL), told apart by their class counts.
IMAGENET21K_P_SIZES = {
    11_221: {"train": 11_797_632, "val": 561_052},  # fall11
    10_450: {"train": 11_060_223, "val": 522_500},  # winter21
}


def read_image_folders(
    root: Path, folders: dict[str, Path], source: str
) -> tuple[list[str], dict[str, list[Sample]], list[Skipped]]:
    """Classes (sorted folders of the `train` tree) and the samples of each split tree."""
    train_dir = folders["train"]
    classes = class_folders(train_dir)
    if not classes:
        raise DataError(f"{source}: {train_dir} holds no class folders")
    skipped: list[Skipped] = []
    splits = {split: list_class_tree(path, classes, root, split, skipped) for split, path in folders.items()}
    return classes, splits, skipped


def _flat_images(folder: Path) -> bool:
    """Whether `folder` holds image files directly (an unsorted ImageNet val folder)."""
    return any(is_image(path.name) for path in folder.iterdir() if path.is_file())


def read_imagenet1k(params: dict) -> RawDataset:
    """ImageNet-1k: `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG` -> `train` / `val`."""
    root = dataset_root(params)
    folders = {split: root / split for split in ("train", "val")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"imagenet1k: missing split folder {folder} (expected {split}/<wnid>/*.JPEG)")
    if not class_folders(folders["val"]) and _flat_images(folders["val"]):
        raise DataError(
            f"imagenet1k: {folders['val']} holds flat images; sort them into val/<wnid>/ first "
            "(e.g. torchvision.datasets.ImageNet(root, split='val') with the devkit does it)"
        )
    classes, splits, skipped = read_image_folders(root, folders, "imagenet1k")
    return RawDataset(
        classes=classes, splits=splits, source=str(root), official_sizes=dict(IMAGENET1K_SIZES), skipped=skipped
    )


def _imagenet21k_folders(root: Path) -> dict[str, Path]:
    """The train/val trees of ImageNet-21K-P, or a DataError telling the expected layout."""
    for train_name, val_name in (("imagenet21k_train", "imagenet21k_val"), ("train", "val")):
        if (root / train_name).is_dir() and (root / val_name).is_dir():
            return {"train": root / train_name, "val": root / val_name}
    raise DataError(
        f"imagenet21k: {root} must hold imagenet21k_train/<wnid>/ and imagenet21k_val/<wnid>/ "
        "(the ImageNet-21K-P layout; train/ and val/ are accepted too). A single tree of per-synset "
        "folders (fall11_whole / winter21_whole untarred) has no official split: run the 21K-P "
        "processing (drop classes with <= 500 images, move the first 50 images of each class to "
        "imagenet21k_val/) or use kind 'custom' with train/ and val/ folders"
    )


def read_imagenet21k(params: dict) -> RawDataset:
    """ImageNet-21K-P: `imagenet21k_train/<wnid>/` and `imagenet21k_val/<wnid>/` -> `train` / `val`."""
    root = dataset_root(params)
    classes, splits, skipped = read_image_folders(root, _imagenet21k_folders(root), "imagenet21k")
    sizes = dict(IMAGENET21K_P_SIZES.get(len(classes), {}))
    return RawDataset(classes=classes, splits=splits, source=str(root), official_sizes=sizes, skipped=skipped)
