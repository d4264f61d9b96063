"""Streaming reads of prepared shards for pre-training: each shard opened at most once per worker and epoch.

`ShardStream(root, split, transform, seed=..., rank=..., world_size=...)` is an IterableDataset over
one split of a prepared dataset (`xtra prepare`); `make_stream_loader(ds, batch_size, num_workers)`
wraps it in a DataLoader. `ds.start_at(epoch, batches_done)` makes the next iteration of that epoch
begin at its batch `batches_done`: the position a resumed run continues from (the pre-training's
data module keeps it in its checkpoints).

Order of epoch e, a pure function of (seed, e, world_size, batch_size), whatever the loader workers:
1. the split's shards in a seeded permutation (`derive_seed(seed, "shards", e)`; the manifest
   order when shuffle is False), their samples concatenated in tar order: the *epoch order*
   (`epoch_order(e)`, global sample indices);
2. the first `world_size * M` samples of it are cut into `world_size` contiguous parts of M, one
   per rank (M = `len(ds)`; `rank_part(e)`);
3. a rank's part, read front to back, goes through a seeded shuffle buffer of `shuffle_buffer`
   samples (`derive_seed(seed, "buffer", e, rank)`): the rank's *yield order* (`rank_order(e)`),
   cut into batches of B;
4. loader worker w of K yields batches w, w + K, w + 2K, ... (from the start position s on:
   s + w, s + w + K, ...), so the DataLoader, which takes one batch from each worker in turn,
   yields batches s, s + 1, s + 2, ... in order for any K.
A worker reads the samples of its batches in ascending position of the rank's part (so it opens
each shard at most once per epoch), one `pread` of its stored bytes each, and holds those read
ahead of their turn: at most `shuffle_buffer` encoded payloads (what a shuffle buffer holds). No
sample is read by two workers. Each sample's transform runs under
`seeded(derive_seed(seed, "aug", e, i))` (i = the sample's index in the split), so its augmentation
is the same whichever rank or worker reads it, and after a resume.

Remainder rule. Every rank yields the same number of samples, M (DDP needs equal batch counts):
with drop_last (the default of `make_stream_loader`), M = floor(N / (world_size * B)) * B, so
every batch is full; without it, M = floor(N / world_size) and each rank's last batch may be
short. The N - world_size * M samples at the *end of epoch e's order* (fewer than
world_size * B) are not read in epoch e; the shard permutation changes each epoch, so the samples
left out change too. All the others are read exactly once per epoch across all ranks.
With a plain DataLoader (no `make_stream_loader`), B = 1.

Position. The position inside an epoch is the number of batches done, the same on every rank and
for any number of workers: `start_at(e, k)` and the next iteration of epoch e yields its batches
k, k + 1, ... exactly as an uninterrupted epoch does (the payloads that would be in the shuffle
buffer at batch k are read again from their shards). Call `set_epoch(e)` before each epoch's
iteration; workers are not persistent, so each epoch's workers see the epoch (and the start) set
in the main process. Before issue 19, worker w read a contiguous run of batches, so the order
depended on the number of workers, which was part of the run's identity; it no longer is.

Why a thin IterableDataset and not a library (numbers in docs/data.md, "Reading prepared data"):
- WebDataset 1.0.2 reads our tars (they are WebDataset-format), but its shuffle buffer state is
  not saveable: resuming at batch k means re-reading the epoch from its start (or an approximate
  position), and it splits shards across ranks by count, not samples, so ranks get unequal sample
  counts when shards differ in size. Its tar parser also re-reads every header and `.cls` member
  that the sidecar index already gives.
- litdata needs its own chunk format (a second copy of 400 GB for ImageNet-21k).
- torchdata's StatefulDataLoader saves one state per worker, so a position saved under K workers
  cannot be restored under another K; the position here is one number, the batches done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xtra.data.prepared import decode_rgb, load_manifest
from xtra.data.rng import derive_seed, seeded
from xtra.data.shards import ShardIndex, index_shards
from xtra.errors import DataError

__all__ = ["ShardStream", "make_stream_loader", "shuffle_buffer_order"]


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) the emit order of a shuffle buffer of `buffer` items fed positions 0..n-1 in order.

    The classic streaming shuffle: fill the buffer, then for each incoming item emit a random
    buffered one and put the new one in its place; at the end emit the rest in random order.
    Position p is never emitted before it has been read, and at most `buffer` are held.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    held = list(range(min(buffer, n)))
    picks = rng.integers(0, len(held), size=max(0, n - len(held)))
    out = np.empty(n, dtype=np.int64)
    for t, incoming in enumerate(range(len(held), n)):
        j = int(picks[t])
        out[t] = held[j]
        held[j] = incoming
    out[n - len(held) :] = rng.permutation(np.array(held, dtype=np.int64))
    return out


class _SequentialShards:
    """Reads payloads in ascending positions: one open per shard (advised sequential), closed when the next opens.

    One `os.pread` per payload (a single copy; 11 us for 46 kB here, against 20-25 us through a
    4 MiB buffered file); the kernel's read-ahead makes the stream of preads a sequential read.
    """

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self._shard, self._fd = -1, -1

    def read(self, i: int) -> bytes:
        idx = self.index
        shard, size = int(idx.shard[i]), int(idx.size[i])
        if shard != self._shard:
            self.close()
            self._fd = os.open(idx.files[shard], os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._shard = shard
        data = os.pread(self._fd, size, int(idx.offset[i]))
        if len(data) != size:
            raise DataError(f"shard {idx.files[shard]}: sample {idx.key(i)!r} is cut short")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._shard, self._fd = -1, -1


class ShardStream(IterableDataset):
    """One split of a prepared dataset, streamed: yields (transform(RGB image), label); see the module doc."""

    def __init__(
        self,
        root: Path,
        split: str,
        transform: Callable[[Any], Any] | None,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"ShardStream: rank {rank} is not in [0, world_size {world_size})")
        self.root = Path(root)
        manifest = load_manifest(self.root)
        self.name: str = manifest.get("dataset", self.root.name)
        if split not in manifest["splits"]:
            known = ", ".join(sorted(manifest["splits"])) or "none"
            raise DataError(f"prepared dataset {self.name!r} ({self.root}) has no split {split!r}; its splits: {known}")
        self.split, self.transform = split, transform
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.shuffle_buffer = bool(shuffle), int(shuffle_buffer)
        self.classes: list[str] = list(manifest["classes"])
        self.num_classes: int = int(manifest["num_classes"])
        self.index = index_shards(self.root, manifest["splits"][split]["shards"])
        counts = np.bincount(self.index.shard, minlength=len(self.index.files))
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)
        self.epoch = 0
        self.batch_size, self.drop_last = 1, False  # set by make_stream_loader
        self._start = (0, 0)  # (epoch, batches done): where an iteration of that epoch begins

    # -- the order ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its shard permutation, shuffle buffer and augmentation)."""
        self.epoch = int(epoch)

    def start_at(self, epoch: int, batches_done: int) -> None:
        """Iterations of `epoch` begin at its batch `batches_done` (a resumed position); other epochs at 0."""
        if not 0 <= batches_done <= self.num_batches:
            raise DataError(
                f"ShardStream {self.name}/{self.split}: cannot start at batch {batches_done} of an epoch of "
                f"{self.num_batches} batches"
            )
        self._start = (int(epoch), int(batches_done))

    @property
    def num_samples(self) -> int:
        """N: samples in the split."""
        return len(self.index)

    def __len__(self) -> int:
        """M: samples this rank yields per epoch (the same on every rank; see the remainder rule)."""
        n, w, b = self.num_samples, self.world_size, self.batch_size
        return (n // (w * b)) * b if self.drop_last else n // w

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (the last one short without drop_last)."""
        return -(-len(self) // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) global sample indices of `epoch`: shards in their seeded permutation, each in tar order."""
        num_shards = len(self.index.files)
        if self.shuffle:
            shards = np.random.default_rng(derive_seed(self.seed, "shards", int(epoch))).permutation(num_shards)
        else:
            shards = np.arange(num_shards)
        starts, ends = self._shard_starts[shards], self._shard_starts[shards + 1]
        if len(shards) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(starts, ends)])

    def rank_part(self, epoch: int) -> np.ndarray:
        """(M,) global indices of this rank's contiguous part of `epoch`'s order (the order they are read in)."""
        m = len(self)
        return self.epoch_order(epoch)[self.rank * m : (self.rank + 1) * m]

    def yield_positions(self, epoch: int) -> np.ndarray:
        """(M,) positions into `rank_part(epoch)` in the order this rank yields them (the shuffle buffer's)."""
        m = len(self)
        if not self.shuffle:
            return np.arange(m)
        rng = np.random.default_rng(derive_seed(self.seed, "buffer", int(epoch), self.rank))
        return shuffle_buffer_order(m, self.shuffle_buffer, rng)

    def rank_order(self, epoch: int) -> np.ndarray:
        """(M,) global indices this rank yields in `epoch`, in order: batch k is `[k * B, (k + 1) * B)`."""
        return self.rank_part(epoch)[self.yield_positions(epoch)]

    # -- reading --------------------------------------------------------------------------------
    def _sample(self, data: bytes, i: int, epoch: int) -> tuple[Any, int]:
        idx = self.index
        img = decode_rgb(data, lambda: f"{idx.files[int(idx.shard[i])]}: sample {idx.key(i)!r}")
        if self.transform is None:
            return img, int(idx.label[i])
        with seeded(derive_seed(self.seed, "aug", epoch, int(i))):
            x = self.transform(img)  # (3, S, S) with the training transforms
        return x, int(idx.label[i])

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start_epoch, done = self._start
        return self.read_batches(self.epoch, done if start_epoch == self.epoch else 0, worker, num_workers)

    def read_batches(self, epoch: int, first: int, worker: int, num_workers: int) -> Iterator[tuple[Any, int]]:
        """The samples of batches first + worker, first + worker + num_workers, ... of `epoch`, in order.

        Read in ascending position of the rank's part (each shard opened at most once), each
        payload held from its read until its turn (at most `shuffle_buffer` of them).
        """
        part, positions, b = self.rank_part(epoch), self.yield_positions(epoch), self.batch_size
        mine = [positions[k * b : (k + 1) * b] for k in range(first + worker, self.num_batches, num_workers)]
        turns = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)  # positions, in yield order
        reads = np.sort(turns).tolist()  # the same positions, in read order
        reader, held, r = _SequentialShards(self.index), {}, 0
        try:
            for p in turns.tolist():
                while r < len(reads) and reads[r] <= p:  # read front to back up to the position to yield
                    held[reads[r]] = reader.read(int(part[reads[r]]))
                    r += 1
                yield self._sample(held.pop(p), int(part[p]), epoch)
        finally:
            reader.close()

    def __repr__(self) -> str:
        return (
            f"ShardStream({self.name!r}, split={self.split!r}, n={self.num_samples}, rank={self.rank}/"
            f"{self.world_size}, per_rank={len(self)})"
        )


def make_stream_loader(ds: ShardStream, batch_size: int, num_workers: int, drop_last: bool = True) -> DataLoader:
    """A DataLoader over `ds` in batches of `batch_size`; sets ds's batch layout (see the remainder rule).

    Workers are started per epoch (not persistent), so `ds.set_epoch` and `ds.start_at` in the main
    process reach them; the DataLoader takes one batch from each worker in turn, in order.
    """
    if batch_size < 1:
        raise DataError(f"make_stream_loader: batch_size must be >= 1, got {batch_size}")
    ds.batch_size, ds.drop_last = int(batch_size), bool(drop_last)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
