"""Streaming reads of prepared shards for pre-training: each shard opened once per epoch, read front to back.

`ShardStream(root, split, transform, seed=..., rank=..., world_size=...)` is an IterableDataset over
one split of a prepared dataset (`xtra prepare`); `make_stream_loader(ds, batch_size, num_workers)`
wraps it in torchdata's `StatefulDataLoader`, whose `state_dict()` / `load_state_dict()` save and
restore the position inside an epoch (Lightning stores it in its checkpoints).

Order of epoch e (a pure function of seed, e, world_size, num_workers and batch_size):
1. the split's shards in a seeded permutation (`derive_seed(seed, "shards", e)`; the manifest
   order when shuffle is False), their samples concatenated in tar order: the *epoch order*
   (`epoch_order(e)`, global sample indices);
2. the first `world_size * M` samples of it are cut into `world_size` contiguous parts of M, one
   per rank (M = `len(ds)`);
3. a rank's part is cut into its batches, and worker w of K reads the w-th contiguous run of
   whole batches (the DataLoader then interleaves the workers' batches);
4. each worker reads its run front to back and emits it through a seeded shuffle buffer of
   `shuffle_buffer` samples (`derive_seed(seed, "buffer", e, rank, w, K)`).
A worker therefore opens only the shards its run touches, each once, and holds at most
`shuffle_buffer` encoded payloads. Each sample's transform runs under
`seeded(derive_seed(seed, "aug", e, i))` (i = the sample's index in the split), so its
augmentation is the same whichever rank or worker reads it, and after a resume.

Remainder rule. Every rank yields the same number of samples, M (DDP needs equal batch counts):
with drop_last (the default of `make_stream_loader`), M = floor(N / (world_size * B)) * B, so
every batch is full; without it, M = floor(N / world_size) and each rank's last batch may be
short. The N - world_size * M samples at the *end of epoch e's order* (fewer than
world_size * B) are not read in epoch e; the shard permutation changes each epoch, so the samples
left out change too. All the others are read exactly once per epoch across all ranks.
With a plain DataLoader (no `make_stream_loader`), B = 1.

State. `state_dict()` (called by StatefulDataLoader inside each worker, after each batch) is
{epoch, yielded, ...}: how many samples this worker's run has emitted. It holds no rank, and at
the same batch count every rank's worker w has emitted the same number, so the rank-0 copy that
Lightning saves restores every rank. Restoring recomputes the order, re-reads the payloads that
were in the shuffle buffer (from the shards they came from) and goes on front to back, so the
batches that follow are exactly those of an uninterrupted epoch. Call `set_epoch(e)` before each
epoch's iteration; a restored state's epoch applies to the next iteration only (a state saved at
the end of an epoch makes StatefulDataLoader start a fresh iteration, which reads the epoch set).
Workers are not persistent, so each epoch's workers see the epoch set in the main process.

Why a thin IterableDataset and not a library (numbers in docs/data.md, "Reading prepared data"):
- WebDataset 1.0.2 reads our tars (they are WebDataset-format), but its shuffle buffer state is
  not saveable: resuming at batch k means re-reading the epoch from its start (or an approximate
  position), and it splits shards across ranks by count, not samples, so ranks get unequal sample
  counts when shards differ in size. Its tar parser also re-reads every header and `.cls` member
  that the sidecar index already gives.
- litdata needs its own chunk format (a second copy of 400 GB for ImageNet-21k).
- torchdata nodes (0.11) give a stateful pipeline but replace the DataLoader contract Lightning
  and the pre-training loop use; `StatefulDataLoader` over a Stateful IterableDataset is the part
  of torchdata that fits, and is what is used here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

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
        self._resume: dict | None = None  # a restored state, used by the next iteration
        self._iter_epoch: int | None = None  # the epoch of the current iteration
        self._yielded = 0  # samples the current iteration has emitted

    # -- the order ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its shard permutation, shuffle buffer and augmentation)."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """N: samples in the split."""
        return len(self.index)

    def __len__(self) -> int:
        """M: samples this rank yields per epoch (the same on every rank; see the remainder rule)."""
        n, w, b = self.num_samples, self.world_size, self.batch_size
        return (n // (w * b)) * b if self.drop_last else n // w

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

    def worker_run(self, epoch: int, worker: int, num_workers: int) -> np.ndarray:
        """Global indices worker `worker` of `num_workers` reads, front to back, in `epoch` (before the buffer)."""
        m, b = len(self), self.batch_size
        part = self.epoch_order(epoch)[self.rank * m : (self.rank + 1) * m]
        num_batches = -(-m // b)
        first, last = worker * num_batches // num_workers, (worker + 1) * num_batches // num_workers
        return part[first * b : min(last * b, m)]

    def _emit_order(self, epoch: int, worker: int, num_workers: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng(derive_seed(self.seed, "buffer", int(epoch), self.rank, worker, num_workers))
        return shuffle_buffer_order(n, self.shuffle_buffer, rng)

    # -- state ----------------------------------------------------------------------------------
    def _layout(self, num_workers: int) -> dict:
        return {
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "num_workers": num_workers,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """{epoch, yielded, and the layout it is valid for}: the position of this worker (rank-agnostic)."""
        info = get_worker_info()
        epoch = self.epoch if self._iter_epoch is None else self._iter_epoch
        return {"epoch": epoch, "yielded": self._yielded, **self._layout(info.num_workers if info else 0)}

    def load_state_dict(self, state: dict) -> None:
        """Resume the next iteration at `state` (from `state_dict` of any rank with the same layout)."""
        info = get_worker_info()
        expected = self._layout(info.num_workers if info else 0)
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {s!r}, now {v!r}" for k, (s, v) in sorted(wrong.items()))
            raise DataError(
                f"ShardStream {self.name}/{self.split}: the saved position is for another layout ({detail})"
            )
        self._resume = {"epoch": int(state["epoch"]), "yielded": int(state["yielded"])}

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
        # The position is taken now, not when the generator starts: StatefulDataLoader may create
        # (and drop) an iterator right after restoring a state, e.g. one saved at the end of an epoch.
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume else self.epoch
        skip = resume["yielded"] if resume else 0
        self._iter_epoch, self._yielded = epoch, skip
        return self._read(epoch, skip, worker, num_workers)

    def _read(self, epoch: int, skip: int, worker: int, num_workers: int) -> Iterator[tuple[Any, int]]:
        """This worker's run of `epoch` from its `skip`-th emitted sample: read front to back, emit in buffer order."""
        run = self.worker_run(epoch, worker, num_workers)
        order = self._emit_order(epoch, worker, num_workers, len(run))  # positions into run
        emitted = np.zeros(len(run), dtype=bool)
        emitted[order[:skip]] = True
        pos = int(np.argmin(emitted)) if not emitted.all() else len(run)  # first position not yet emitted
        reader, pending = _SequentialShards(self.index), {}
        try:
            for p in order[skip:]:
                while pos <= p:  # read front to back up to the position to emit
                    if not emitted[pos]:
                        pending[pos] = reader.read(int(run[pos]))
                    pos += 1
                sample = self._sample(pending.pop(int(p)), int(run[p]), epoch)
                self._yielded += 1
                yield sample
        finally:
            reader.close()

    def __repr__(self) -> str:
        return (
            f"ShardStream({self.name!r}, split={self.split!r}, n={self.num_samples}, rank={self.rank}/"
            f"{self.world_size}, per_rank={len(self)})"
        )


def make_stream_loader(
    ds: ShardStream, batch_size: int, num_workers: int, drop_last: bool = True
) -> StatefulDataLoader:
    """A StatefulDataLoader over `ds` in batches of `batch_size`; sets ds's batch layout (see the remainder rule).

    Workers are started per epoch (not persistent), so `ds.set_epoch` in the main process reaches them.
    """
    if batch_size < 1:
        raise DataError(f"make_stream_loader: batch_size must be >= 1, got {batch_size}")
    ds.batch_size, ds.drop_last = int(batch_size), bool(drop_last)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch's deprecated set_vital in its __init__
        warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
        return StatefulDataLoader(
            ds,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
