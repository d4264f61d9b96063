"""The streaming reader: opens per shard, exactly-once across ranks, an order fixed by (seed, epoch, world size,
batch size) for any number of loader workers, exact resume onto another number of workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xtra.data.prepare import prepare_dataset
from xtra.data.source import RawDataset, Sample
from xtra.data.streaming import ShardStream, make_stream_loader, shuffle_buffer_order
from xtra.errors import DataError

# more workers than this machine may have cores: the order test needs 3
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

N, SHARD = 206, 5  # 42 shards, the last one holding a single sample
IMAGES = np.random.default_rng(1).integers(0, 256, (N, 6, 7, 3), dtype=np.uint8)

# -- counting shard opens, in this process and in forked loader workers -------------------------
_OPEN_LOG: int | None = None  # fd of the log file while a test counts


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPEN_LOG is not None and str(args[0]).endswith(".tar"):
        os.write(_OPEN_LOG, f"{os.getpid()}\t{args[0]}\n".encode())


sys.addaudithook(_audit)


def _count_opens(tmp: Path, fn) -> tuple[object, list[tuple[str, str]]]:
    """Run fn() while logging every open of a .tar file: (fn's result, [(pid, path)])."""
    global _OPEN_LOG
    log = tmp / "opens.log"
    _OPEN_LOG = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        result = fn()
    finally:
        os.close(_OPEN_LOG)
        _OPEN_LOG = None
    return result, [tuple(line.split("\t")) for line in log.read_text().splitlines()]


def reader(params: dict) -> RawDataset:
    samples = [Sample(f"s{i:04d}", IMAGES[i], i) for i in range(N)]  # label = sample id
    return RawDataset([f"c{i}" for i in range(N)], {"train": samples}, "arrays")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    params = {"kind": "custom", "root": None, "image_size": 0, "shard_size": SHARD, "num_workers": 1}
    prepare_dataset("many", params, out, reader=reader)
    return out / "many"


def draw(img) -> torch.Tensor:
    """A 'transform' that shows its augmentation draw: (mean pixel, a random number from torch)."""
    return torch.stack([torch.tensor(float(np.asarray(img).mean())), torch.rand(())])


def stream(root: Path, rank: int = 0, world: int = 1, seed: int = 3, **kw) -> ShardStream:
    return ShardStream(root, "train", draw, seed=seed, rank=rank, world_size=world, shuffle_buffer=16, **kw)


def batches(loader) -> list[tuple[list[int], list[float]]]:
    """Each batch as (labels = sample ids, augmentation draws)."""
    return [(y.tolist(), x[:, 1].tolist()) for x, y in loader]


def test_shuffle_buffer_order_is_a_bounded_permutation() -> None:
    for n, buf in ((0, 4), (1, 4), (3, 8), (100, 7)):
        out = shuffle_buffer_order(n, buf, np.random.default_rng(0))
        assert sorted(out.tolist()) == list(range(n))
        assert all(p < t + buf for t, p in enumerate(out.tolist()))  # never more than buf ahead of the reads


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_two_workers_open_each_shard_once_and_read_each_sample_once(
    prepared: Path, tmp_path: Path, drop_last: bool
) -> None:
    streams = [stream(prepared, rank=r, world=2) for r in range(2)]
    loaders = [make_stream_loader(ds, batch_size=4, num_workers=2, drop_last=drop_last) for ds in streams]
    seen, opens = _count_opens(tmp_path, lambda: [[i for b in batches(ld) for i in b[0]] for ld in loaders])
    per_rank = 100 if drop_last else 103  # floor(206 / (2 * 4)) * 4, or floor(206 / 2)
    assert [len(s) for s in seen] == [per_rank, per_rank] == [len(ds) for ds in streams]
    assert not set(seen[0]) & set(seen[1])
    order = streams[0].epoch_order(0)  # global indices; their labels are the sample ids
    assert sorted(order.tolist()) == list(range(N))
    ids = streams[0].index.label[order].tolist()
    assert set(seen[0]) | set(seen[1]) == set(ids[: 2 * per_rank])  # the tail of the order is left out
    # every (worker, shard) pair opens at most once; a shard is opened by the 2 workers of each rank that reads it
    pairs = [(pid, path) for pid, path in opens]
    assert len(pairs) == len(set(pairs)) and len({pid for pid, _ in pairs}) == 4
    shards = {path for _, path in pairs}
    assert len(shards) >= 41 - drop_last and len(pairs) <= 2 * (len(shards) + 1)  # one shard may span both ranks


def test_workers_read_each_payload_once_and_hold_at_most_a_buffer(prepared: Path, monkeypatch) -> None:
    """A rank's K workers read disjoint samples, each stored payload once, and hold at most `shuffle_buffer`."""
    from xtra.data import streaming

    reads: list[int] = []
    original = streaming._SequentialShards.read

    def counted(self, i: int) -> bytes:
        reads.append(i)
        return original(self, i)

    monkeypatch.setattr(streaming._SequentialShards, "read", counted)
    ds = stream(prepared, rank=1, world=2)
    make_stream_loader(ds, batch_size=4, num_workers=0)
    for workers in (1, 3):
        reads.clear()
        for w in range(workers):
            before, yielded, most_held = len(reads), 0, 0
            for _ in ds.read_batches(0, 0, w, workers):
                yielded += 1
                most_held = max(most_held, len(reads) - before - yielded)  # read, not yet yielded
            assert yielded == len(range(w, ds.num_batches, workers)) * 4
            assert most_held <= ds.shuffle_buffer
        assert sorted(reads) == sorted(ds.rank_part(0).tolist())  # every sample of the rank's part, once


def test_order_is_fixed_by_seed_and_epoch(prepared: Path) -> None:
    def epoch(e: int, seed: int = 3) -> list:
        ds = stream(prepared, seed=seed)
        ds.set_epoch(e)
        return batches(make_stream_loader(ds, batch_size=8, num_workers=0))

    first = epoch(0)
    assert first == epoch(0)
    assert [b[0] for b in first] != [b[0] for b in epoch(1)]
    assert [b[0] for b in first] != [b[0] for b in epoch(0, seed=4)]
    assert [i for b in first for i in b[0]] != sorted(i for b in first for i in b[0])  # shuffled


@pytest.mark.parametrize("drop_last", [False, True])
def test_order_is_the_same_for_0_1_2_3_workers(prepared: Path, drop_last: bool) -> None:
    def epoch(rank: int, workers: int) -> list:
        ds = stream(prepared, rank=rank, world=2)
        ds.set_epoch(1)
        return batches(make_stream_loader(ds, batch_size=4, num_workers=workers, drop_last=drop_last))

    for rank in range(2):
        expected = epoch(rank, 0)
        ds = stream(prepared, rank=rank, world=2)
        make_stream_loader(ds, batch_size=4, num_workers=0, drop_last=drop_last)
        assert [i for b in expected for i in b[0]] == ds.index.label[ds.rank_order(1)].tolist()
        assert len(expected[-1][0]) == (4 if drop_last else 103 % 4)  # the remainder rule: a short last batch
        for workers in (1, 2, 3):
            assert epoch(rank, workers) == expected, (rank, workers)  # the same batches, draws included


def test_augmentation_does_not_depend_on_rank_or_workers(prepared: Path) -> None:
    def draws(world: int, workers: int) -> dict[int, float]:
        out = {}
        for r in range(world):
            ds = stream(prepared, rank=r, world=world)
            ds.set_epoch(2)
            for ids, aug in batches(make_stream_loader(ds, batch_size=4, num_workers=workers, drop_last=False)):
                out.update(zip(ids, aug))
        return out

    one, two = draws(1, 0), draws(2, 2)
    assert one and all(one[i] == two[i] for i in two)


def test_shuffle_off_reads_in_manifest_order(prepared: Path) -> None:
    ds = stream(prepared, shuffle=False)
    ids = [i for b in batches(make_stream_loader(ds, batch_size=10, num_workers=0, drop_last=False)) for i in b[0]]
    assert ids == ds.index.label.tolist() and sorted(ids) == list(range(N))  # shard by shard, in tar order


@pytest.mark.parametrize("before, after", [(0, 2), (2, 0), (2, 3)])
def test_a_position_resumes_onto_another_number_of_workers(prepared: Path, before: int, after: int) -> None:
    """Killed after k batches under `before` workers, resumed from (epoch, k) under `after`: every rank goes on
    with exactly the batches an uninterrupted epoch gives (the position is rank- and worker-agnostic)."""

    def loader(rank: int, workers: int, start: int | None = None) -> object:
        ds = stream(prepared, rank=rank, world=2)
        ds.set_epoch(1)
        made = make_stream_loader(ds, batch_size=4, num_workers=workers)
        if start is not None:
            ds.start_at(1, start)
        return made

    full = [batches(loader(r, before)) for r in range(2)]
    k = 7
    head = [(y.tolist(), x[:, 1].tolist()) for _, (x, y) in zip(range(k), iter(loader(0, before)))]
    assert head == full[0][:k]  # the "killed" run
    for rank in range(2):
        assert batches(loader(rank, after, start=k)) == full[rank][k:]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_position_applies_to_its_epoch_only(prepared: Path, workers: int) -> None:
    """What a trainer does: start at (1, k), finish epoch 1, set_epoch(2), iterate: epoch 2 from its start;
    a position at the end of epoch 1 (k = all its batches) yields nothing more of it."""

    def loader_at(e: int) -> tuple[ShardStream, object]:
        ds = stream(prepared)
        ds.set_epoch(e)
        return ds, make_stream_loader(ds, batch_size=8, num_workers=workers)

    expected = {e: batches(loader_at(e)[1]) for e in (1, 2)}
    n = len(expected[1])
    for k in (3, n):
        ds, resumed = loader_at(1)
        ds.start_at(1, k)
        assert batches(resumed) == expected[1][k:]
        ds.set_epoch(2)
        assert batches(resumed) == expected[2]
    with pytest.raises(DataError, match=f"cannot start at batch {n + 1} of an epoch of {n} batches"):
        loader_at(1)[0].start_at(1, n + 1)


def test_bad_rank_and_split_are_named(prepared: Path) -> None:
    with pytest.raises(DataError, match="rank 2"):
        stream(prepared, rank=2, world=2)
    with pytest.raises(DataError, match="no split 'val'"):
        ShardStream(prepared, "val", None, seed=0)


def test_damaged_sample_is_named(prepared: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    ds = stream(copy, shuffle=False)
    offset, size = int(ds.index.offset[3]), int(ds.index.size[3])
    with open(copy / "train-000000.tar", "r+b") as f:  # same size, garbage payload
        f.seek(offset)
        f.write(bytes(size))
    with pytest.raises(DataError, match=rf"train-000000.tar: sample '{ds.index.key(3)}' cannot be decoded"):
        list(ds)
