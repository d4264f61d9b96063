"""Prepared-dataset loading: manifest checks, transforms, DDP sampling, index fallback, bench."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from xtra.bench.data import run_data_bench
from xtra.data.images import resize_shorter
from xtra.data.prepare import prepare_dataset
from xtra.data.prepared import PreparedDataset, make_loader
from xtra.data.source import RawDataset, Sample
from xtra.data.transforms import eval_transform, pretrain_transform, randaugment_transform
from xtra.errors import DataError

N, S = 40, 16
IMAGES = np.random.default_rng(0).integers(0, 256, (N, 18, 24, 3), dtype=np.uint8)


def reader(params: dict) -> RawDataset:
    samples = [Sample(f"s{i:03d}", IMAGES[i], i % 4) for i in range(N)]
    return RawDataset(["w", "x", "y", "z"], {"train": samples}, "arrays")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    params = {"kind": "custom", "root": None, "image_size": S, "shard_size": 7, "num_workers": 1}
    prepare_dataset("toy", params, out, reader=reader)
    return out / "toy"


def test_missing_dataset_or_split_is_named(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(DataError, match=r"'imagenet1k' not found.*manifest.json.*xtra prepare imagenet1k"):
        PreparedDataset(tmp_path / "imagenet1k", "train")
    with pytest.raises(DataError, match=r"'toy'.*no split 'val'.*train"):
        PreparedDataset(prepared, "val")


def test_items_are_the_stored_images(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train")
    assert len(ds) == N and ds.classes == ["w", "x", "y", "z"] and ds.num_classes == 4
    ids = [int(ds.key(i)[1:]) for i in range(N)]  # key s005 holds IMAGES[5]; preparation shuffles the order
    assert sorted(ids) == list(range(N)) and ids != sorted(ids)
    assert ds.targets.tolist() == [i % 4 for i in ids]
    img, label = ds[ids.index(5)]
    expected = resize_shorter(Image.fromarray(IMAGES[5]), S)  # PNG is lossless
    assert label == 1 and img.size == (21, 16) and np.array_equal(np.asarray(img), np.asarray(expected))
    with pytest.raises(IndexError):
        ds[N]


@pytest.mark.parametrize(
    "make, bounded",
    [
        (pretrain_transform, True),
        (randaugment_transform, False),  # random erasing fills with N(0, 1) noise, past the pixel range
        (lambda s: eval_transform(s, resize=s + 2), True),
    ],
)
def test_transforms_give_normalised_tensors(prepared: Path, make, bounded: bool) -> None:
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # timm's RandAugment draws from `random`
    ds = PreparedDataset(prepared, "train", make(S))
    lo = (0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    hi = (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    for i in range(4):
        x, _ = ds[i]
        assert x.shape == (3, S, S) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
        if bounded:
            assert bool((x.amin(dim=(1, 2)) >= lo - 1e-4).all() and (x.amax(dim=(1, 2)) <= hi + 1e-4).all())
    # uniform noise pixels in [0, 1] normalise to mean (0.5 - m) / s per channel, roughly
    batch = torch.stack([ds[i][0] for i in range(N)])  # (N, 3, S, S)
    expected = (0.5 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    assert torch.allclose(batch.mean(dim=(0, 2, 3)), expected, atol=0.25)


def test_probe_randaugment_survives_top_posterize_magnitude() -> None:
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits, which Pillow 13 rejects."""
    from timm.data.auto_augment import RandAugment

    tf = randaugment_transform(S)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(IMAGES[0])
    assert np.asarray(op(img)).max() == 0  # black, as Pillow < 13 gave
    op.magnitude = 5
    assert np.asarray(op(img)).max() > 0


def test_eval_transform_normalises_exactly() -> None:
    grey = Image.new("RGB", (40, 30), (128, 128, 128))
    x = eval_transform(24)(grey)  # resize 27, centre crop 24
    expected = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    assert x.shape == (3, 24, 24) and torch.allclose(x[:, 12, 12], expected, atol=1e-5)


def test_fused_normalisation_is_bit_identical_to_torchvision() -> None:
    from torchvision import transforms as T

    from xtra.data.transforms import ToNormalisedTensor

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (17, 23, 3), dtype=np.uint8))
    reference = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(T.ToTensor()(img))
    fused = ToNormalisedTensor()(img)
    assert fused.shape == (3, 17, 23) and fused.is_contiguous() and torch.equal(fused, reference)
    with pytest.raises(ValueError, match="mode 'L'"):
        ToNormalisedTensor()(img.convert("L"))


def test_two_ranks_see_disjoint_samples_covering_the_dataset(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train", eval_transform(S, S))
    loaders = [make_loader(ds, 8, num_workers=0, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [list(loader.sampler) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))
    labels = torch.cat([y for _, y in loaders[1]])
    assert labels.tolist() == [int(ds.key(i)[1:]) % 4 for i in seen[1]]


def test_epoch_shuffle_differs_and_is_reproducible(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train")
    order = {e: list(make_loader(ds, 8, seed=1, epoch=e, rank=0, world_size=1).sampler) for e in (0, 1)}
    assert order[0] != order[1] and sorted(order[0]) == list(range(N))
    loader = make_loader(ds, 8, seed=1, epoch=0, rank=0, world_size=1)
    assert list(loader.sampler) == order[0]
    loader.sampler.set_epoch(1)  # what Lightning does each epoch
    assert list(loader.sampler) == order[1]
    assert list(make_loader(ds, 8, seed=2, rank=0, world_size=1).sampler) != order[0]
    assert list(make_loader(ds, 8, shuffle=False, rank=0, world_size=1).sampler) == list(range(N))


def test_loader_with_workers_yields_batches(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train", pretrain_transform(S))
    batches = list(make_loader(ds, 16, num_workers=2, seed=0, rank=0, world_size=1, drop_last=True))
    assert len(batches) == N // 16
    x, y = batches[0]
    assert x.shape == (16, 3, S, S) and y.shape == (16,) and y.dtype == torch.int64


def test_shards_without_sidecar_index_are_scanned(tmp_path: Path, prepared: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        (copy / shard.pop("index")).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    scanned, indexed = PreparedDataset(copy, "train"), PreparedDataset(prepared, "train")
    for field in ("offset", "size", "label", "shard"):
        assert np.array_equal(getattr(scanned._reader.index, field), getattr(indexed._reader.index, field))
    assert np.array_equal(np.asarray(scanned[7][0]), np.asarray(indexed[7][0]))


def test_damaged_shard_is_reported(tmp_path: Path, prepared: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    ds = PreparedDataset(copy, "train")
    offset, size = int(ds._reader.index.offset[0]), int(ds._reader.index.size[0])
    with open(copy / "train-000000.tar", "r+b") as f:  # same size, garbage payload
        f.seek(offset)
        f.write(bytes(size))
    with pytest.raises(DataError, match=rf"train-000000.tar: sample '{ds.key(0)}' cannot be decoded"):
        PreparedDataset(copy, "train")[0]
    (copy / "train-000002.tar").unlink()
    with pytest.raises(DataError, match="train-000002.tar .*missing"):
        PreparedDataset(copy, "train")
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match="train-000001.tar has 3000 bytes"):
        PreparedDataset(copy, "train")


def test_bench_reports_every_path(prepared: Path, capsys) -> None:
    result = run_data_bench(prepared, num_images=N, batch_size=8, img_size=S)
    assert all(result[k]["images"] == N for k in ("stream", "stream_decode", "decode", "random"))
    assert result["stream"]["opens_per_1000"] == 1000 * 6 / N  # 6 shards, each opened once
    assert result["decode"]["opens_per_1000"] == 0
    cores = result["cores_per_gpu"]
    assert cores["XTRA-B/16"] == pytest.approx(1240 / result["stream"]["per_core"])
    out = capsys.readouterr().out
    assert "streaming reader + transform" in out and "bare decode" in out and "cores per GPU for XTRA-H/14" in out
