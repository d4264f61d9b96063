"""Readers of each dataset kind's official on-disk format, one module per layout, in a registry.

A reader takes the dataset's params section (`kind`, `root`, `split_seed`, `heldout_fraction`,
`partition`, `split_lists`, ...) and returns a `RawDataset`; it opens no image (the preparation
stage does). Each module registers its kinds with `@register_reader("kind")`; the registry imports
every module of this package on first use, so a new kind is a new module here (`docs/extending.md`),
and `datasets.<name>.kind` of params is checked against it. Heavy libraries (scikit-learn, scipy,
h5py, wilds and through it torch) are imported inside the readers that need them, so importing
this package is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xtra.data.readers.common import check_unique_keys
from xtra.data.source import RawDataset, Reader
from xtra.errors import DataError
from xtra.registry import Registry

__all__ = ["DatasetKind", "READERS", "register_reader", "read_dataset"]


# The splits a kind writes: their names, or a function of the dataset's params that finds them in its
# files (a class-folder tree's optional `test/`); None: the kind does not say (not checked).
Splits = tuple[str, ...] | Callable[[dict], tuple[str, ...]] | None


@dataclass(frozen=True)
class DatasetKind:
    """A registered dataset kind: its reader, whether its data ships inside a package (no `root`), and
    the splits it writes (checked against the benchmarks' `train_split` / `eval_split` by `xtra validate`)."""

    name: str
    read: Reader
    embedded: bool = False
    splits: Splits = None

    def splits_of(self, params: dict, look: bool = True) -> tuple[str, ...] | None:
        """The splits a dataset of this kind will have; None when the kind does not say, or when they
        depend on its files and `look` is off (a check of the params file alone)."""
        if callable(self.splits):
            return self.splits(params) if look else None
        return self.splits


READERS: Registry[DatasetKind] = Registry("dataset kind", __name__)


def register_reader(kind: str, *, embedded: bool = False, splits: Splits = None) -> Callable[[Reader], Reader]:
    """Decorator: register a reader function as the reader of dataset kind `kind` (see `DatasetKind`)."""

    def register(read: Reader) -> Reader:
        READERS.add(kind, DatasetKind(kind, read, embedded, splits))
        return read

    return register


def read_dataset(params: dict) -> RawDataset:
    """The RawDataset of a dataset's params section, dispatched on params["kind"].

    Raises a DataError naming the kind when it is unknown, and naming the root when a kind that
    reads files has no existing root folder. Checks that sample keys are unique.
    """
    kind = params.get("kind")
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(READERS.names())}")
    entry = READERS[kind]
    if not entry.embedded:
        root = params.get("root")
        if root is None or not Path(str(root)).expanduser().is_dir():
            raise DataError(f"dataset kind {kind!r}: root {root!r} does not exist or is not a folder")
    dataset = entry.read(params)
    check_unique_keys(dataset.splits, f"{kind} at {dataset.source}")
    return dataset
