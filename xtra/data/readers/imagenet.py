"""Readers of ImageNet-1k and ImageNet-21k laid out as ImageFolder trees of wnid folders.

Classes are the sorted wnids of the training tree (torchvision ImageFolder / ImageNet order). A
`meta.bin` beside the trees (torchvision's parsed devkit) is not needed and not read: the class
list stays the wnids, as in every SSL code base that probes on ImageNet.

ImageNet-21k comes in two layouts (params `layout`):
- `21k_p`: ImageNet-21K-P (Alibaba-MIIL), `imagenet21k_train/<wnid>/` and `imagenet21k_val/<wnid>/`
  (11.1M-11.8M images, 10,450 or 11,221 classes, 50 val images a class);
- `per_synset`: the full release untarred, `<root>/<wnid>/*.JPEG` (winter21: 19,167 synsets,
  13,153,500 images; fall11: 21,841 synsets, 14,197,122 images). It has no official split: `val`
  holds out round(heldout_fraction x n_c) images of every class c, drawn with a seeded permutation
  per class (`derive_seed(split_seed, "heldout", wnid)`), and `train` keeps the rest. The expected
  split sizes are the release's total minus that held-out count, so a partial copy is reported.
- `auto` (default): `21k_p` when its two folders exist, else `per_synset` when the root holds wnid folders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import Skipped, class_folders, dataset_root, is_image, list_class_tree
from xtra.data.rng import derive_seed
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError

__all__ = ["read_imagenet1k", "read_imagenet21k", "read_image_folders", "heldout_per_class", "PER_SYNSET_RELEASES"]

IMAGENET1K_SIZES = {"train": 1_281_167, "val": 50_000}
# ImageNet-21K-P (Alibaba-MIIL), told apart by their class counts.
IMAGENET21K_P_SIZES = {
    11_221: {"train": 11_797_632, "val": 561_052},  # fall11
    10_450: {"train": 11_060_223, "val": 522_500},  # winter21
}
# The full per-synset releases, told apart by their synset counts: {synsets: (release, images)}.
PER_SYNSET_RELEASES = {19_167: ("winter21", 13_153_500), 21_841: ("fall11", 14_197_122)}
_WNID = re.compile(r"^n\d{8}$")


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


@register_reader("imagenet1k", splits=tuple(IMAGENET1K_SIZES))
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


def _imagenet21k_folders(root: Path) -> dict[str, Path] | None:
    """The train/val trees of ImageNet-21K-P, or None."""
    for train_name, val_name in (("imagenet21k_train", "imagenet21k_val"), ("train", "val")):
        if (root / train_name).is_dir() and (root / val_name).is_dir():
            return {"train": root / train_name, "val": root / val_name}
    return None


def _layout(root: Path, layout: str) -> str:
    """`21k_p` or `per_synset`, as params `layout` says or (auto) as the root shows; a DataError otherwise."""
    if layout in ("21k_p", "auto") and _imagenet21k_folders(root) is not None:
        return "21k_p"
    has_synsets = any(_WNID.match(name) for name in class_folders(root))
    if layout in ("per_synset", "auto") and has_synsets:
        return "per_synset"
    raise DataError(
        f"imagenet21k: {root} does not hold the {layout!r} layout: expected imagenet21k_train/<wnid>/ and "
        "imagenet21k_val/<wnid>/ (21k_p; train/ and val/ are accepted too) or <wnid>/*.JPEG folders "
        "(per_synset: fall11_whole / winter21_whole untarred)"
    )


def heldout_per_class(labels: np.ndarray, classes: list[str], fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: round(fraction x n_c) samples of every class c held out, by a seeded permutation per class."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {fraction}")
    held = np.zeros(len(labels), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(classes) + 1))
    for c, name in enumerate(classes):
        members = order[bounds[c] : bounds[c + 1]]  # this class's samples, in listing order
        k = int(round(fraction * len(members)))
        if k:
            held[np.random.default_rng(derive_seed(seed, "heldout", name)).permutation(members)[:k]] = True
    return held


def _read_per_synset(root: Path, params: dict) -> RawDataset:
    classes = class_folders(root)
    skipped: list[Skipped] = []
    samples = list_class_tree(root, classes, root, "train", skipped)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    held = heldout_per_class(
        labels, classes, float(params.get("heldout_fraction", 0.2)), int(params.get("split_seed", 0))
    )
    splits = {"train": [s for s, h in zip(samples, held) if not h], "val": [s for s, h in zip(samples, held) if h]}
    sizes = {}
    if len(classes) in PER_SYNSET_RELEASES:
        total = PER_SYNSET_RELEASES[len(classes)][1]
        sizes = {"train": total - int(held.sum()), "val": int(held.sum())}
    source = f"{root} (per-synset layout)"
    return RawDataset(classes=classes, splits=splits, source=source, official_sizes=sizes, skipped=skipped)


@register_reader("imagenet21k", splits=("train", "val"))
def read_imagenet21k(params: dict) -> RawDataset:
    """ImageNet-21k in the 21K-P or the per-synset layout (params `layout`, see the module doc) -> `train` / `val`."""
    root = dataset_root(params)
    if _layout(root, str(params.get("layout", "auto"))) == "per_synset":
        return _read_per_synset(root, params)
    folders = _imagenet21k_folders(root)
    assert folders is not None
    classes, splits, skipped = read_image_folders(root, folders, "imagenet21k")
    sizes = dict(IMAGENET21K_P_SIZES.get(len(classes), {}))
    return RawDataset(classes=classes, splits=splits, source=str(root), official_sizes=sizes, skipped=skipped)
