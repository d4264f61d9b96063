"""Helpers shared by the readers: root and file checks, sample keys, class-folder trees, seeded splits."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from xtra.data.source import Sample
from xtra.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Skipped",
    "dataset_root",
    "find_layout",
    "require_file",
    "require_dir",
    "make_key",
    "array_key",
    "is_image",
    "listed_sample",
    "listed_samples",
    "list_class_tree",
    "class_folders",
    "check_unique_keys",
    "stratified_indices",
    "read_lines",
    "classes_from_ids",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# (split, source, reason): a sample a reader had to drop.
Skipped = tuple[str, str, str]

_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")


def dataset_root(params: dict) -> Path:
    """The existing folder named by params["root"]; a DataError naming the kind otherwise."""
    kind = params.get("kind", "?")
    root = params.get("root")
    if root is None or str(root) == "":
        raise DataError(f"dataset kind {kind!r}: params key 'root' is not set (path of the raw dataset)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset kind {kind!r}: root {path} does not exist or is not a folder")
    return path


def find_layout(root: Path, candidates: Sequence[str], markers: Sequence[str], kind: str) -> Path:
    """The first folder root/<candidate> (in the given order) that holds every marker path.

    Lets a user point `root` at the folder torchvision expects or at the dataset folder itself.
    Raises a DataError listing what was looked for when no candidate matches.
    """
    for candidate in candidates:
        folder = root / candidate
        if all((folder / marker).exists() for marker in markers):
            return folder
    tried = ", ".join(str(root / c) for c in candidates)
    raise DataError(f"{kind}: no folder holding {', '.join(markers)} found under {root} (looked in {tried})")


def require_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a file, else a DataError naming it."""
    if not path.is_file():
        raise DataError(f"missing {what}: {path}")
    return path


def require_dir(path: Path, what: str = "folder") -> Path:
    """`path` if it is a folder, else a DataError naming it."""
    if not path.is_dir():
        raise DataError(f"missing {what}: {path}")
    return path


def make_key(relpath: str) -> str:
    """A WebDataset-safe key from a relative path: every character but [0-9A-Za-z_-] becomes '_'."""
    return _UNSAFE.sub("_", relpath)


def array_key(split: str, index: int) -> str:
    """The key of the index-th in-memory image of a split, e.g. `train_0000042`."""
    return f"{split}_{index:07d}"


def is_image(name: str) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def listed_sample(
    root: Path, relpath: str, label: int, num_classes: int, split: str, skipped: list[Skipped]
) -> Sample | None:
    """The Sample of a file listed by a split file, or None (recorded in `skipped`) when bad."""
    if not 0 <= label < num_classes:
        skipped.append((split, relpath, f"label {label} out of range 0..{num_classes - 1}"))
        return None
    path = root / relpath
    if not path.is_file():
        skipped.append((split, str(path), "file listed by the split file is missing"))
        return None
    return Sample(key=make_key(relpath), image=path, label=label)


def listed_samples(
    root: Path, entries: Iterable[tuple[str, int]], num_classes: int, split: str, skipped: list[Skipped]
) -> list[Sample]:
    """The Samples of the (relpath, label) entries of a split file; bad entries go to `skipped`."""
    samples = (listed_sample(root, relpath, label, num_classes, split, skipped) for relpath, label in entries)
    return [sample for sample in samples if sample is not None]


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of `folder` (ImageFolder's class order), hidden ones left out."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _walk_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable (sorted) order; hidden files and folders
    (`.ipynb_checkpoints/`, macOS `._x.jpg` resource forks) are left out."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / n for n in sorted(filenames) if is_image(n) and not n.startswith("."))
    return files


def list_class_tree(
    split_dir: Path, classes: Sequence[str], key_root: Path, split: str, skipped: list[Skipped]
) -> list[Sample]:
    """ImageFolder listing of `split_dir/<class>/...` with the given class order.

    A class folder of `split_dir` that is not in `classes` is a DataError; a class folder
    without images is recorded in `skipped`. Keys are relative to `key_root`.
    """
    index = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    for name in class_folders(split_dir):
        if name not in index:
            raise DataError(f"class folder {split_dir / name} is not a class of the training split")
        files = _walk_images(split_dir / name)
        if not files:
            skipped.append((split, str(split_dir / name), "empty class folder (no image files)"))
        for path in files:
            key = make_key(path.relative_to(key_root).as_posix())
            samples.append(Sample(key=key, image=path, label=index[name]))
    return samples


def check_unique_keys(splits: dict[str, list[Sample]], source: str) -> None:
    """A DataError naming the first key that two samples share."""
    seen: dict[str, str] = {}
    for split, samples in splits.items():
        for sample in samples:
            if sample.key in seen:
                raise DataError(f"{source}: sample key {sample.key!r} is used twice ({seen[sample.key]} and {split})")
            seen[sample.key] = split


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices of a stratified split holding out `fraction` of the samples: the
    project's one stratified split (the demo and EuroSAT splits, the probe's held-out protocol).

    scikit-learn's stratified `train_test_split` (`random_state=seed`, ceil(fraction * n) held out).
    Where that cannot stratify (a class of one sample, or fewer held-out or kept samples than
    classes), each class holds out its share instead: round(fraction * n) in all, the rounding
    remainders given to the largest fractions, at least one sample of every class kept.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    n_held = math.ceil(fraction * len(labels))
    if counts.min() >= 2 and min(n_held, len(labels) - n_held) >= len(classes):
        kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
        return np.sort(kept), np.sort(held)
    rng = np.random.default_rng(seed)
    exact = fraction * counts
    quota = np.minimum(np.floor(exact).astype(np.int64), counts - 1)  # per class, one sample always kept
    short = int(round(fraction * counts.sum())) - int(quota.sum())
    for c in np.lexsort((rng.random(len(counts)), -(exact - np.floor(exact)))):  # largest remainder first
        if short <= 0:
            break
        if quota[c] < counts[c] - 1:
            quota[c] += 1
            short -= 1
    held = [rng.permutation(np.flatnonzero(labels == cls))[:q] for cls, q in zip(classes, quota)]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(held_idx) == 0:
        raise DataError(f"a held-out fraction of {fraction} holds out no sample of {len(labels)}")
    return np.setdiff1d(np.arange(len(labels)), held_idx), held_idx


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, non-comment stripped lines of a text file; a DataError naming it when missing."""
    require_file(path, what)
    with open(path, encoding="utf-8") as handle:
        return [s for s in (line.strip() for line in handle) if s and not s.startswith("#")]


def classes_from_ids(pairs: Iterable[tuple[int, str]], source: str) -> list[str]:
    """Class names indexed by id from (id, name) pairs; ids must be 0..K-1 with one name each."""
    names: dict[int, str] = {}
    for class_id, name in pairs:
        if names.setdefault(class_id, name) != name:
            raise DataError(f"{source}: class id {class_id} names both {names[class_id]!r} and {name!r}")
    if not names:
        raise DataError(f"{source}: no classes found")
    if min(names) < 0:
        raise DataError(f"{source}: negative class id {min(names)}")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{source}: class ids are not contiguous from 0 (no entry has id {missing[:5]})")
    return [names[i] for i in range(len(names))]
