"""What decides whether a prepared dataset is up to date: the params that change shard bytes, and the inputs.

- `SHARD_KEYS_EXCLUDED`: dataset keys that never change the shards (worker count, scheduler
  resources, the cadence/limit keys that only decide whether a run fails). They are neither hashed
  nor written to the manifest, so editing them leaves shards *and* manifest byte-identical.
- `tree_fingerprint(root)`: sha256 of (relative path, size, mtime_ns) of *every* file under the raw
  dataset's root, one `os.scandir` walk with one stat per file. Links to folders are followed once
  (a loop or a second link to a walked folder counts as the link itself), dangling links and link
  loops count as entries of size -1: the walk never fails on them. It sees image files, split lists,
  metadata CSV/JSON/.mat and HDF5 files (PCAM) alike, before any reader runs, so the up-to-date
  check needs no listing, no second stat and no shard hash.
- `listing_fingerprint(raw)`: sha256 of a reader's listing (classes, source, sizes, drops, and
  every sample's split, key, label and image: file path with size and mtime, array content, or a
  loader's file and row). It is the input identity of datasets without a root (embedded sets,
  readers passed in by tests), and is recorded in every manifest so `xtra prepare --verify` can
  re-list and compare.
- `preparation_hash(params, inputs, version)`: the hash stored as the manifest's `params_hash` (not
  `xtra.config.params_hash`, which hashes one params section alone).

A change to a reader's *code* that lists the same files differently is not seen by the tree
fingerprint: bump `FORMAT_VERSION` in `xtra.data.prepare`, or run `xtra prepare --verify`/`--force`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xtra.data.images import IMAGE_POLICY
from xtra.data.source import RawDataset

__all__ = ["SHARD_KEYS_EXCLUDED", "shard_params", "tree_fingerprint", "listing_fingerprint", "preparation_hash"]

SHARD_KEYS_EXCLUDED = frozenset({"num_workers", "resources", "max_skipped_fraction", "size_check"})


def shard_params(params: dict) -> dict:
    """The dataset params that change shard bytes (all but SHARD_KEYS_EXCLUDED)."""
    return {k: v for k, v in sorted(params.items()) if k not in SHARD_KEYS_EXCLUDED}


def _walk(folder: str, chain: tuple[str, ...], walked: set[str]) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file under folder, depth first in sorted name order.

    `chain` holds the real paths of the folders walked down to `folder`, `walked` every real folder
    walked so far. A link to a folder is followed unless its target is on `chain` (a loop: `up -> ..`,
    `again -> .`), holds the root, or was walked already; then it counts as one entry: its path with
    the link's text, size -2. A dangling link or a link loop to a file counts with size and mtime -1.
    """
    walked.add(chain[-1])
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:  # a link loop
            is_dir = False
        if is_dir:
            link = entry.is_symlink()
            real = os.path.realpath(entry.path) if link else os.path.join(chain[-1], entry.name)
            holds_root = chain[0].startswith(real.rstrip(os.sep) + os.sep)
            if link and (real in chain or real in walked or holds_root):
                yield f"{entry.path} -> {os.readlink(entry.path)}", -2, -2
            else:
                yield from _walk(entry.path, chain + (real,), walked)
        else:
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:  # a dangling link, a link loop
                yield entry.path, -1, -1
                continue
            yield entry.path, st.st_size, st.st_mtime_ns


def tree_fingerprint(root: Path) -> tuple[str, int]:
    """(sha256 hex, number of files) of the (relative path, size, mtime_ns) of every file under root."""
    h, n, base = hashlib.sha256(), 0, len(str(root).rstrip(os.sep)) + 1
    for path, size, mtime in _walk(str(root), (os.path.realpath(root),), set()):
        h.update(f"{path[base:]}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
        n += 1
    return h.hexdigest(), n


def _file_id(path: object) -> str:
    try:
        st = Path(str(path)).stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _image_id(image: object, files: dict[str, str], stat: bool) -> str:
    """A sample image's identity; `files` memoises the stat of files that many samples share."""
    if isinstance(image, (str, Path)):
        return _file_id(image) if stat else str(image)
    if isinstance(image, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        return f"array:{image.shape}:{image.dtype}:{digest}"
    path = getattr(image, "path", None)  # a loader reading a row of a file (PCAM's H5Row)
    row = getattr(image, "index", None)
    if path and str(path) not in files:
        files[str(path)] = _file_id(path) if stat else str(path)
    return f"{type(image).__qualname__}:{files.get(str(path), '')}:{getattr(image, 'name', '')}:{row}"


def listing_fingerprint(raw: RawDataset, stat_files: bool = True) -> str:
    """sha256 of a reader's listing: classes, source, sizes, drops and every sample's image identity.

    With stat_files False, files count by path only (their size and mtime are in the tree fingerprint).
    """
    h = hashlib.sha256()
    head = {"classes": raw.classes, "source": raw.source, "official": raw.official_sizes, "skipped": raw.skipped}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    files: dict[str, str] = {}
    for split in sorted(raw.splits):
        for s in sorted(raw.splits[split], key=lambda s: s.key):
            h.update(f"{split}\t{s.key}\t{s.label}\t{_image_id(s.image, files, stat_files)}\n".encode())
    return h.hexdigest()


def preparation_hash(params: dict, inputs: str, version: int) -> str:
    """The hash that decides whether a prepared dataset is up to date: format, policy, shard params, inputs."""
    blob = {"version": version, "policy": IMAGE_POLICY, "params": shard_params(params), "input": inputs}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
