"""`xtra bench data DATASET`: how many CPU cores one GPU needs to be fed, measured against the decode limit.

One process, one torch thread, so every rate is *per core*: images per CPU-second of this
process (`time.process_time`, robust to other load on the machine), with the wall-clock rate
beside it. It measures the part of an epoch that rank 0 of N // num_images ranks reads (about
`num_images` samples, its shards read once beforehand so the page cache is warm: these are CPU
costs, not the storage's) and times:

- `stream`: the streaming reader (`ShardStream`, what pre-training reads) through the pre-training
  transform, each sample under its augmentation seed, batched by `make_stream_loader`;
- `stream_decode`: the same reader without the transform (read + decode), against which
- `decode`: a bare decode of the same stored payloads already in memory: the limit of any reader;
- `seeding_ms`: the CPU cost of the per-sample augmentation seed the streaming path pays;
- `random`: random access (`PreparedDataset`, one pread per sample through an LRU of 32 open
  shards) of as many samples drawn uniformly from the whole split, through the same transform
  and batching (its shards are not pre-read).
File opens are counted with a Python audit hook ("open" events on `.tar` files) and given per
1,000 samples. Cores per GPU = goal images/s per GPU / images/s per core of `stream`, for the
goals of XTRA-B/16 (1,240 images/s per H200) and H/14 (290). Nothing here asserts a timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from xtra.data.prepared import PreparedDataset, decode_rgb
from xtra.data.rng import derive_seed, seeded
from xtra.data.streaming import ShardStream, make_stream_loader
from xtra.data.transforms import pretrain_transform
from xtra.errors import DataError

__all__ = ["GOALS", "count_opens", "run_data_bench", "format_bench"]

GOALS = {"XTRA-B/16": 1240.0, "XTRA-H/14": 290.0}  # training images/s per GPU (H200)
_OPENS: list[list[str] | None] = [None]  # the open log while counting, else None
_HOOKED = [False]


def _audit(event: str, args: tuple) -> None:
    log = _OPENS[0]
    if log is not None and event == "open" and str(args[0]).endswith(".tar"):
        log.append(str(args[0]))


@contextmanager
def count_opens() -> Iterator[list[str]]:
    """A list that collects the paths of `.tar` files opened in this process inside the block."""
    if not _HOOKED[0]:
        sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is idle outside the block
        _HOOKED[0] = True
    log: list[str] = []
    _OPENS[0] = log
    try:
        yield log
    finally:
        _OPENS[0] = None


def _timed(fn: Callable[[], int]) -> dict:
    """Run fn (returns images done) counting opens; {images, cpu_s, wall_s, per_core, wall_rate, opens_per_1000}."""
    with count_opens() as opens:
        wall, cpu = time.perf_counter(), time.process_time()
        images = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "images": images,
        "cpu_s": cpu,
        "wall_s": wall,
        "per_core": images / cpu if cpu > 0 else 0.0,
        "wall_rate": images / wall if wall > 0 else 0.0,
        "opens_per_1000": 1000.0 * len(opens) / max(images, 1),
    }


def _part(root: Path, split: str, seed: int, n: int, tf: Callable | None) -> ShardStream:
    """Rank 0 of as many ranks as make its part about n samples: the work one rank does in an epoch."""
    whole = ShardStream(root, split, None, seed=seed)
    return ShardStream(root, split, tf, seed=seed, rank=0, world_size=max(1, whole.num_samples // n))


def _warm(ds: ShardStream) -> None:
    """Read the shards the measured part touches once (untimed): the rates are CPU costs, not the storage's."""
    for shard in np.unique(ds.index.shard[ds.rank_part(0)]):
        with open(ds.index.files[int(shard)], "rb") as f:
            while f.read(1 << 24):
                pass


def _batches(loader: Iterable) -> int:
    return sum(len(y) for _, y in loader)  # each batch: (B, 3, S, S), (B,)


def _plain(ds: ShardStream) -> int:
    return sum(1 for _ in ds)  # PIL images, no transform, no loader


def _bare_decode(ds: ShardStream) -> dict:
    """Decode the stored payloads the part reads, read into memory first (not timed)."""
    reader = PreparedDataset(ds.root, ds.split)._reader
    ids = ds.rank_part(0)
    payloads = [reader.read(int(i)) for i in ids]
    reader.close()

    def run() -> int:
        for data in payloads:
            decode_rgb(data, lambda: "bench")
        return len(payloads)

    return _timed(run)


def _random_access(root: Path, split: str, tf: Callable, n: int, seed: int, batch: int) -> dict:
    """n samples drawn uniformly from the split, one pread each through PreparedDataset, batched by a DataLoader."""
    ds = PreparedDataset(root, split, tf)
    picks = np.random.default_rng(seed).choice(len(ds), size=n, replace=len(ds) < n)
    try:
        return _timed(lambda: _batches(DataLoader(Subset(ds, picks.tolist()), batch_size=batch)))
    finally:
        ds._reader.close()


def _seeding_ms(seed: int, n: int) -> float:
    """CPU ms per sample of entering and leaving the per-sample augmentation seed (`xtra.data.rng`)."""
    start = time.process_time()
    for i in range(n):
        with seeded(derive_seed(seed, "aug", 0, i)):
            pass
    return 1000.0 * (time.process_time() - start) / n


def run_data_bench(
    root: Path, split: str = "train", img_size: int = 224, num_images: int = 2048, batch_size: int = 32, seed: int = 0
) -> dict:
    """Measure one prepared split (see the module doc); prints the table and returns the numbers."""
    tf = pretrain_transform(img_size)
    part = _part(root, split, seed, num_images, tf)
    n = len(part)
    if n < batch_size:
        raise DataError(f"{part.name}/{split}: {n} images are too few for batches of {batch_size}")
    _warm(part)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {
            "dataset": part.name,
            "split": split,
            "img_size": img_size,
            "images": n,
            "batch_size": batch_size,
            "shards": len(part.index.files),
            "shard_size": part.num_samples / max(1, len(part.index.files)),
        }
        results["stream"] = _timed(lambda: _batches(make_stream_loader(part, batch_size, 0, drop_last=False)))
        plain = _part(root, split, seed, num_images, None)
        results["stream_decode"] = _timed(lambda: _plain(plain))
        results["decode"] = _bare_decode(part)
        results["random"] = _random_access(root, split, tf, n, seed, batch_size)
        results["seeding_ms"] = _seeding_ms(seed, n)
    finally:
        torch.set_num_threads(threads)
    results["cores_per_gpu"] = {goal: rate / results["stream"]["per_core"] for goal, rate in GOALS.items()}
    results["stream_vs_decode"] = results["stream_decode"]["per_core"] / results["decode"]["per_core"]
    print(format_bench(results))
    return results


def format_bench(results: dict) -> str:
    """The bench result as a text table."""
    lines = [
        f"data bench: {results['dataset']}/{results['split']}, {results['images']} images, pre-training transform "
        f"{results['img_size']} px, {results['shards']} shards of ~{results['shard_size']:.0f}; "
        "one process, one thread",
        f"  {'path':<42}{'img/s/core':>11}{'img/s wall':>11}{'opens/1k':>10}",
    ]
    labels = {
        "stream": "streaming reader + transform (pre-training)",
        "random": "random access + transform",
        "stream_decode": "streaming reader, decode only",
        "decode": "bare decode in memory (the limit)",
    }
    for key, label in labels.items():
        r = results[key]
        lines.append(f"  {label:<42}{r['per_core']:>11.0f}{r['wall_rate']:>11.0f}{r['opens_per_1000']:>10.1f}")
    lines.append(f"  streaming decode-only / bare decode: {results['stream_vs_decode']:.2f}x")
    lines.append(
        f"  per-sample augmentation seeding (in the streaming path only): {results['seeding_ms']:.3f} ms/sample"
    )
    for goal, cores in results["cores_per_gpu"].items():
        lines.append(f"  cores per GPU for {goal} at {GOALS[goal]:.0f} img/s: {cores:.1f}")
    return "\n".join(lines)
