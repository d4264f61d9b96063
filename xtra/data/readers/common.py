"""Helpers shared by the readers: root and file checks, sample keys, class-folder trees, seeded splits."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile

from xtra.data.source import Sample
from xtra.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Skipped",
    "NotTaken",
    "dataset_root",
    "find_layout",
    "require_file",
    "require_dir",
    "make_key",
    "unique_keys",
    "array_key",
    "is_image",
    "not_an_image",
    "listed_sample",
    "listed_samples",
    "list_class_tree",
    "class_folders",
    "check_unique_keys",
    "stratified_indices",
    "read_lines",
    "classes_from_ids",
]


def _decodable_extensions() -> frozenset[str]:
    """The file extensions of every format this Pillow opens and decodes itself.

    Stubs (BUFR, GRIB, HDF5, WMF: identified, decoded only by a handler an application installs) and
    MPEG (a header reader with no pixel decoder) are left out; MPO, which Pillow opens through its
    JPEG plugin, is in.
    """
    Image.init()
    decodable = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if (factory is not None and not stub and fmt != "MPEG") or fmt == "MPO":
            decodable.add(ext.lower())
    return frozenset(decodable)


IMAGE_EXTENSIONS = _decodable_extensions()  # .jpg .png .jfif .avif (where built in) .tif .webp .bmp ...

# (split, source, reason): a sample a reader had to drop; counted in the skipped fraction.
Skipped = tuple[str, str, str]


class NotTaken(NamedTuple):
    """A file or folder under the root that is not a sample (hidden, not an image, outside a class
    folder, a link loop or a link out of its class folder, an empty class folder), with its reason.

    Readers put these in `RawDataset.skipped` beside the samples they dropped; preparation lists them
    apart (`not_taken` in the manifest) and does not count them in the skipped fraction.
    """

    split: str
    source: str
    reason: str


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


def unique_keys(relpaths: Sequence[str]) -> list[str]:
    """The `make_key` of each relative path, made unique: paths whose keys collide (`猫.png` and
    `犬.png`, `photo 1.png` and `photo_1.png`) each get `_` and the first 10 hex digits of the sha256
    of their own path appended. A key that no other path shares keeps the form it always had.
    """
    keys = [make_key(relpath) for relpath in relpaths]
    count: dict[str, int] = {}
    for key in keys:
        count[key] = count.get(key, 0) + 1
    return [
        key
        if count[key] == 1
        else f"{key}_{hashlib.sha256(relpath.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"
        for key, relpath in zip(keys, relpaths)
    ]


def array_key(split: str, index: int) -> str:
    """The key of the index-th in-memory image of a split, e.g. `train_0000042`."""
    return f"{split}_{index:07d}"


def is_image(name: str) -> bool:
    """Whether a file name has the extension of a format Pillow decodes (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def not_an_image(name: str) -> str:
    """The reason a file with this name is not a candidate image."""
    ext = os.path.splitext(name)[1]
    if not ext:
        return "not an image: no file extension"
    return f"not an image: extension {ext!r} is not a format Pillow decodes"


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


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a folder or a link to one; False for a link loop or a dangling link."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of `folder` (ImageFolder's class order), hidden ones left out."""
    return sorted(entry.name for entry in os.scandir(folder) if _is_dir(entry) and not entry.name.startswith("."))


def _inside(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_files(folder: Path, root: str, split: str, taken: dict[str, str], skipped: list[Skipped]) -> list[Path]:
    """The image files of one class folder, each real file once, in a stable order; the rest go to `skipped`.

    The real tree of the folder is walked first (sorted names), then the links met in it, in the order
    met. A link is followed when it leads inside the class folder, or out of the dataset `root`
    altogether (a tree of links into a store of images); never when it leads elsewhere under `root`
    (another class's or split's files would be relabelled or listed twice), to a folder holding the
    class folder or one the walk came through (a loop), or to a folder walked already. A real file
    reached a second time (a link to a file listed already, here or in another class in `taken`) is
    listed once, under the path met first, files reached without a link first. Hidden files and
    folders, files Pillow does not decode, dangling links and link loops are NotTaken with a reason.
    """
    top = os.path.realpath(folder)
    files: list[Path] = []
    walked: set[str] = set()
    links: list[tuple[Path, tuple[str, ...]]] = []  # (link, real paths of the folders above it)

    def take(path: Path, real: str) -> None:
        if real in taken:
            skipped.append(NotTaken(split, str(path), f"the same file as {taken[real]} (reached through a link)"))
            return
        taken[real] = str(path)
        files.append(path)

    def walk(path: Path, chain: tuple[str, ...]) -> None:
        walked.add(chain[-1])
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(NotTaken(split, str(path), f"folder cannot be read ({exc.strerror or exc})"))
            return
        for entry in entries:
            entry_path = Path(entry.path)
            if entry.name.startswith("."):
                hidden = "hidden folder (its files are not read)" if _is_dir(entry) else "hidden file"
                skipped.append(NotTaken(split, entry.path, hidden))
            elif entry.is_symlink():
                links.append((entry_path, chain))
            elif entry.is_dir(follow_symlinks=False):
                walk(entry_path, chain + (os.path.join(chain[-1], entry.name),))
            elif is_image(entry.name):
                take(entry_path, os.path.join(chain[-1], entry.name))
            else:
                skipped.append(NotTaken(split, entry.path, not_an_image(entry.name)))

    walk(folder, (top,))
    for path, chain in links:  # grows while links are followed: the links met there are followed in turn
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            target = os.readlink(path)
            reason = f"link loop (-> {target})" if exc.errno == errno.ELOOP else f"dangling link (-> {target}, missing)"
            skipped.append(NotTaken(split, str(path), reason))
            continue
        real = os.path.realpath(path)
        if _inside(top, real) or (stat.S_ISDIR(mode) and real in chain):
            skipped.append(NotTaken(split, str(path), f"link loop (-> {real}, a folder above the link)"))
        elif not _inside(real, top) and _inside(real, root):
            skipped.append(NotTaken(split, str(path), f"link out of the class folder (-> {real})"))
        elif stat.S_ISDIR(mode):
            if real in walked:
                skipped.append(NotTaken(split, str(path), f"link to a folder listed already (-> {real})"))
            else:
                walk(path, chain + (real,))
        elif is_image(path.name):
            take(path, real)
        else:
            skipped.append(NotTaken(split, str(path), not_an_image(path.name)))
    return files


def list_class_tree(
    split_dir: Path,
    classes: Sequence[str],
    key_root: Path,
    split: str,
    skipped: list[Skipped],
    taken: dict[str, str] | None = None,
) -> list[Sample]:
    """ImageFolder listing of `split_dir/<class>/...` with the given class order.

    A class folder of `split_dir` that is not in `classes` is a DataError. Links are followed as
    `_class_files` says, with `key_root` as the dataset's root; a class folder that is itself a link
    into the dataset (`val/cat -> ../train/cat`) is not read. What is not a sample (a class folder
    without images, hidden files, other files, loops) is recorded in `skipped` as NotTaken. Keys are
    the relative paths from `key_root`, made unique by `unique_keys`. `taken` (real path -> the path
    listed) carries the files listed already across calls, so a file reached by links from two splits
    is listed once.
    """
    index = {name: i for i, name in enumerate(classes)}
    root = os.path.realpath(key_root)
    taken = {} if taken is None else taken
    paths: list[Path] = []
    labels: list[int] = []
    for name in class_folders(split_dir):
        if name not in index:
            raise DataError(f"class folder {split_dir / name} is not a class of the training split")
        folder = split_dir / name
        real = os.path.realpath(folder)
        if folder.is_symlink() and (_inside(real, root) or _inside(root, real)):
            skipped.append(NotTaken(split, str(folder), f"class folder is a link into the dataset (-> {real})"))
            continue
        files = _class_files(folder, root, split, taken, skipped)
        if not files:
            skipped.append(NotTaken(split, str(folder), "empty class folder (no image files)"))
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    keys = unique_keys([path.relative_to(key_root).as_posix() for path in paths])
    return [Sample(key=key, image=path, label=label) for key, path, label in zip(keys, paths, labels)]


def check_unique_keys(splits: dict[str, list[Sample]], source: str) -> None:
    """A DataError naming the first key that two samples share, and both samples' files."""
    seen: dict[str, tuple[str, Sample]] = {}
    for split, samples in splits.items():
        for sample in samples:
            if sample.key in seen:
                first_split, first = seen[sample.key]
                raise DataError(
                    f"{source}: sample key {sample.key!r} is used twice: {first.image} ({first_split}) "
                    f"and {sample.image} ({split})"
                )
            seen[sample.key] = (split, sample)


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
