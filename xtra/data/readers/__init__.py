"""Readers of each dataset kind's official on-disk format: `read_dataset(params)` lists its samples.

A reader takes the dataset's params section (`kind`, `root`, `split_seed`, `heldout_fraction`,
`partition`, `split_lists`, ...) and returns a `RawDataset`. Readers open no image; the
preparation stage does. Heavy libraries (scikit-learn, scipy, h5py, wilds
and through it torch) are imported inside the readers that need them, so importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path

from xtra.data.readers.cars import read_cars
from xtra.data.readers.cifar import read_cifar10, read_cifar100
from xtra.data.readers.common import check_unique_keys
from xtra.data.readers.custom import read_custom
from xtra.data.readers.demo import read_digits, read_mnist5k
from xtra.data.readers.domainnet import read_infograph
from xtra.data.readers.dtd import read_dtd
from xtra.data.readers.eurosat import read_eurosat
from xtra.data.readers.food101 import read_food101
from xtra.data.readers.imagenet import read_imagenet1k, read_imagenet21k
from xtra.data.readers.inat import read_inat2018
from xtra.data.readers.pcam import read_pcam
from xtra.data.readers.pets import read_pets
from xtra.data.readers.wilds_sets import read_camelyon17, read_fmow, read_iwildcam, read_rxrx1
from xtra.data.source import RawDataset, Reader
from xtra.errors import DataError

__all__ = ["READERS", "EMBEDDED_KINDS", "read_dataset"]

READERS: dict[str, Reader] = {
    "mnist5k": read_mnist5k,
    "digits": read_digits,
    "imagenet1k": read_imagenet1k,
    "imagenet21k": read_imagenet21k,
    "inat2018": read_inat2018,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "food101": read_food101,
    "dtd": read_dtd,
    "pets": read_pets,
    "cars": read_cars,
    "pcam": read_pcam,
    "eurosat": read_eurosat,
    "iwildcam": read_iwildcam,
    "camelyon17": read_camelyon17,
    "rxrx1": read_rxrx1,
    "fmow": read_fmow,
    "infograph": read_infograph,
    "custom": read_custom,
}

# kinds whose data ships inside a package: they need no root
EMBEDDED_KINDS: frozenset[str] = frozenset({"mnist5k", "digits"})


def read_dataset(params: dict) -> RawDataset:
    """The RawDataset of a dataset's params section, dispatched on params["kind"].

    Raises a DataError naming the kind when it is unknown, and naming the root when a kind that
    reads files has no existing root folder. Checks that sample keys are unique.
    """
    kind = params.get("kind")
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(READERS)}")
    if kind not in EMBEDDED_KINDS:
        root = params.get("root")
        if root is None or not Path(str(root)).expanduser().is_dir():
            raise DataError(f"dataset kind {kind!r}: root {root!r} does not exist or is not a folder")
    dataset = READERS[kind](params)
    check_unique_keys(dataset.splits, f"{kind} at {dataset.source}")
    return dataset
