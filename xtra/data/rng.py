"""Seeds as pure functions of where a random draw happens, so a resumed run redraws the same numbers.

Augmentation draws from Python's `random` (timm's RandAugment), numpy and torch's global generator
(torchvision's RandomResizedCrop, flip, erasing). Instead of saving and restoring those streams per
rank and loader worker, each sample's transform runs under generators seeded from
`(seed, epoch, sample)`: its augmentation is then the same whichever rank, worker or resume reads
it, and a killed run continues with exactly the draws an uninterrupted run would make. The same
rule seeds per-step model randomness (stochastic depth) from `(seed, rank, step)`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

__all__ = ["derive_seed", "seeded"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the given parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with `random`, numpy and torch's CPU generator seeded from `seed`; restore them after."""
    import torch  # here: the readers derive seeds without torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)  # the CPU generator only (no CUDA initialisation)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
