"""`xtra prepare`: determinism, caching, bad files, atomicity, split-size checks and the CLI."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xtra.config import section_defaults
from xtra.data import prepare as prep
from xtra.data.prepared import PreparedDataset
from xtra.data.rng import derive_seed
from xtra.data.source import RawDataset, Sample
from xtra.errors import DataError, ParamsError

CLASSES = ["a", "b", "c"]


def array_reader(n: int = 30, official: dict | None = None, seed: int = 0):
    """A reader of n random (12, 20) uint8 RGB arrays: `train` (2/3) and `val` (1/3)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 12, 20, 3), dtype=np.uint8)
    cut = 2 * n // 3

    def reader(params: dict) -> RawDataset:
        # listed out of key order on purpose: preparation sorts by key
        train = [Sample(f"tr{i:03d}", images[i], i % 3) for i in reversed(range(cut))]
        val = [Sample(f"va{i:03d}", images[i], i % 3) for i in range(cut, n)]
        return RawDataset(list(CLASSES), {"train": train, "val": val}, "arrays", dict(official or {}))

    return reader


def params(**kw) -> dict:
    base = {"kind": "custom", "root": None, "image_size": 8, "shard_size": 7, "num_workers": 1}
    return {**base, **kw}


def shard_digests(manifest: dict) -> dict[str, str]:
    return {s["file"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


def test_prepare_twice_identical_and_second_run_skipped(tmp_path: Path, capsys) -> None:
    reader = array_reader()
    first = prep.prepare_dataset("toy", params(num_workers=2), tmp_path / "a", reader=reader)
    assert first["splits"]["train"]["count"] == 20 and first["splits"]["val"]["count"] == 10
    assert len(first["splits"]["train"]["shards"]) == 3 and first["num_classes"] == 3
    shard = tmp_path / "a" / "toy" / "train-000000.tar"
    mtime = shard.stat().st_mtime_ns
    again = prep.prepare_dataset("toy", params(num_workers=2), tmp_path / "a", reader=reader)
    assert "up to date" in capsys.readouterr().out
    assert again == first and shard.stat().st_mtime_ns == mtime
    # forced, in one process, elsewhere: byte-identical shards, indexes and manifest
    other = prep.prepare_dataset("toy", params(num_workers=1), tmp_path / "b", reader=reader, force=True)
    assert shard_digests(other) == shard_digests(first)
    a, b = (tmp_path / d / "toy" / "manifest.json" for d in "ab")
    assert json.loads(a.read_text())["params_hash"] == json.loads(b.read_text())["params_hash"]
    with tarfile.open(shard) as tar:
        names = tar.getnames()[:4]
        keys = [f"tr{i:03d}" for i in range(20)]  # sorted by key, then the split's fixed permutation
        first_two = [keys[i] for i in np.random.default_rng(derive_seed("sample order", "train")).permutation(20)[:2]]
        assert names == [f"{first_two[0]}.cls", f"{first_two[0]}.png", f"{first_two[1]}.cls", f"{first_two[1]}.png"]
        assert first_two != keys[:2]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


def test_changed_param_or_input_reprepares(tmp_path: Path) -> None:
    first = prep.prepare_dataset("toy", params(), tmp_path, reader=array_reader())
    bigger = prep.prepare_dataset("toy", params(image_size=10), tmp_path, reader=array_reader())
    assert bigger["params_hash"] != first["params_hash"]
    assert shard_digests(bigger) != shard_digests(first)
    assert PreparedDataset(tmp_path / "toy", "val").image(0).size == (17, 10)  # shorter side 10
    kept = prep.prepare_dataset("toy", params(image_size=10, keep_original=True), tmp_path, reader=array_reader())
    with tarfile.open(tmp_path / "toy" / "val-000000.tar") as tar:
        assert "va020.orig.png" in tar.getnames()
    other_pixels = prep.prepare_dataset(
        "toy", params(image_size=10, keep_original=True), tmp_path, reader=array_reader(seed=1)
    )
    assert other_pixels["params_hash"] != kept["params_hash"]
    # num_workers does not change the output, so it does not re-prepare
    same = prep.prepare_dataset(
        "toy", params(image_size=10, keep_original=True, num_workers=2), tmp_path, reader=array_reader(seed=1)
    )
    assert same["params_hash"] == other_pixels["params_hash"]


def test_defaults_are_the_schema_ones(tmp_path: Path) -> None:
    from xtra.config import load_schema

    schema = load_schema()["$defs"]["dataset"]["properties"]
    defaults = prep.dataset_defaults()
    assert defaults["image_size"] == schema["image_size"]["default"] == 256
    assert set(defaults) == {k for k, v in schema.items() if "default" in v}


def write_tree(root: Path) -> None:
    """A `custom` class-folder tree: train/a (3 PNGs), train/b (2), val/a (1), plus a file no sample reads."""
    for i, rel in enumerate(["train/a", "train/a", "train/a", "train/b", "train/b", "val/a"]):
        (root / rel).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((9, 11, 3), 40 * i, dtype=np.uint8)).save(root / rel / f"{i}.png")
    (root / "meta.txt").write_text("v1\n")


def test_up_to_date_check_is_cheap_and_sees_every_input_file(tmp_path: Path, monkeypatch, capsys) -> None:
    from xtra.data import readers

    raw, out = tmp_path / "raw", tmp_path / "out"
    write_tree(raw)
    p = params(kind="custom", root=str(raw))
    first = prep.prepare_dataset("toy", p, out)
    manifest = (out / "toy" / "manifest.json").read_bytes()
    assert "num_workers" not in first["params"] and "size_check" not in first["params"]
    assert first["inputs"]["tree_files"] == 7 and first["sample_order"] == prep.SAMPLE_ORDER

    def no_listing(params: dict) -> RawDataset:
        raise AssertionError("the up-to-date check listed the raw data")

    with monkeypatch.context() as m:
        m.setattr(readers, "read_dataset", no_listing)
        m.setattr(prep, "sha256_file", lambda path: pytest.fail(f"hashed {path}"))
        # editing keys that do not change shards: up to date without listing or hashing, manifest untouched
        again = prep.prepare_dataset("toy", {**p, "num_workers": 2, "max_skipped_fraction": 0.5}, out)
    assert again == first and (out / "toy" / "manifest.json").read_bytes() == manifest
    assert "up to date" in capsys.readouterr().out
    # --verify: re-lists and re-hashes, finds nothing, keeps the folder
    prep.prepare_dataset("toy", p, out, verify=True)
    assert "verified" in capsys.readouterr().out and (out / "toy" / "manifest.json").read_bytes() == manifest
    # a damaged shard of the same size: only --verify sees it, and prepares again
    shard = out / "toy" / "train-000000.tar"
    shard.write_bytes(bytes(shard.stat().st_size))
    prep.prepare_dataset("toy", p, out)
    assert shard.read_bytes() == bytes(shard.stat().st_size)
    fixed = prep.prepare_dataset("toy", p, out, verify=True)
    assert "does not match its recorded sha256" in capsys.readouterr().out
    assert shard_digests(fixed) == shard_digests(first) and (out / "toy" / "manifest.json").read_bytes() == manifest
    # any input file changes the fingerprint, even one no sample reads (split lists, metadata)
    (raw / "meta.txt").write_text("v2, longer\n")
    changed = prep.prepare_dataset("toy", p, out)
    assert changed["params_hash"] != first["params_hash"] and shard_digests(changed) == shard_digests(first)


def test_pcam_files_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    from tests.fixtures.raw import make_pcam
    from xtra.data.fingerprint import listing_fingerprint, tree_fingerprint
    from xtra.data.readers import read_dataset

    info = make_pcam(tmp_path)
    tree, listing = tree_fingerprint(tmp_path)[0], listing_fingerprint(read_dataset(info.params))
    x = next(tmp_path.rglob("*_train_x.h5"))
    x.write_bytes(x.read_bytes() + b"\0")  # the same rows, another file
    assert tree_fingerprint(tmp_path)[0] != tree
    assert listing_fingerprint(read_dataset(info.params)) != listing  # H5Row samples carry their file's stat


def save_bad_tree(root: Path) -> None:
    """A class-folder tree with one file of each awkward kind; class `c` is an empty folder."""
    rng = np.random.default_rng(0)
    a, b = root / "a", root / "b"
    for d in (a, b, root / "c"):
        d.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(a / "big.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(a / "rgb.png")
    (a / "truncated.jpg").write_bytes((a / "big.jpg").read_bytes()[:1500])
    (a / "random.jpg").write_bytes(rng.bytes(700))
    (a / "empty.png").write_bytes(b"")
    Image.new("L", (16, 16), 77).save(b / "grey.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8] = (255, 0, 0, 255)  # top opaque red, bottom fully transparent
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    Image.new("LA", (16, 16), (0, 0)).save(b / "la.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(b / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(b / "deep.png")  # I;16
    Image.new("RGB", (16, 16), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(b / "palette.png")
    Image.new("1", (16, 16), 1).save(b / "bits.png")


def tree_reader(root: Path):
    """A minimal class-folder reader for the test, plus one sample whose label is out of range."""

    def reader(params: dict) -> RawDataset:
        train = [
            Sample(f"{d.name}_{f.stem}", f, CLASSES.index(d.name))
            for d in sorted(root.iterdir())
            for f in sorted(d.iterdir())
        ]
        train.append(Sample("zz_badlabel", root / "a" / "rgb.png", 7))
        return RawDataset(list(CLASSES), {"train": train}, str(root), {}, [("train", "a/gone.jpg", "missing file")])

    return reader


@pytest.mark.faults
def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    save_bad_tree(tmp_path / "raw")
    p = params(image_size=72, max_skipped_fraction=0.5)
    manifest = prep.prepare_dataset("tree", p, tmp_path / "out", reader=tree_reader(tmp_path / "raw"))
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"gone.jpg", "truncated.jpg", "random.jpg", "empty.png", "rgb.png"}
    assert "truncated" in reasons["truncated.jpg"] and "cannot identify" in reasons["random.jpg"]
    assert reasons["rgb.png"] == "label 7 out of range [0, 3)" and reasons["gone.jpg"] == "missing file"
    assert all(s["split"] == "train" for s in manifest["skipped"])
    assert manifest["skipped_fraction"] == pytest.approx(5 / 14)  # 13 listed + 1 dropped by the reader
    assert manifest["num_classes"] == 3 and manifest["splits"]["train"]["count"] == 9
    ds = PreparedDataset(tmp_path / "out" / "tree", "train")
    images = {ds.key(i): ds.image(i) for i in range(len(ds))}
    assert all(img.mode == "RGB" for img in images.values())
    assert (
        images["a_big"].size == (96, 72) and ds._reader.index.is_jpeg.sum() == 2
    )  # big, cmyk: JPEG sources stored > 64 px
    assert images["b_rgba"].getpixel((0, 0))[0] > 240 and images["b_rgba"].getpixel((0, 71)) == (255, 255, 255)
    assert images["b_la"].getpixel((5, 5)) == (255, 255, 255)  # alpha composited on white
    r, g, b = images["b_cmyk"].getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60
    assert images["b_deep"].getpixel((8, 8)) == (255, 255, 255)  # 16-bit full scale -> 255
    assert images["b_grey"].getpixel((8, 8)) == (77, 77, 77)
    assert images["b_palette"].getpixel((8, 8))[2] > 200 and images["b_bits"].getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.faults
def test_too_many_bad_files_is_a_data_error(tmp_path: Path) -> None:
    save_bad_tree(tmp_path / "raw")
    with pytest.raises(DataError, match=r"tree.*skipped.*max_skipped_fraction.*(truncated|random|empty)"):
        prep.prepare_dataset(
            "tree", params(max_skipped_fraction=0.2), tmp_path / "out", reader=tree_reader(tmp_path / "raw")
        )
    assert [p.name for p in (tmp_path / "out" / "tree").iterdir()] == [prep.FAILED_LIST]  # the reasons, no dataset


def test_interrupted_run_leaves_no_dataset(tmp_path: Path, monkeypatch) -> None:
    real_add, calls = prep.ShardWriter.add, []

    def failing_add(self, *args, **kw):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt("killed mid-way")
        return real_add(self, *args, **kw)

    monkeypatch.setattr(prep.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset("toy", params(), tmp_path, reader=array_reader())
    assert list(tmp_path.iterdir()) == []  # neither toy/ nor .toy.partial/
    # a previous finished dataset survives a failed re-preparation untouched
    monkeypatch.setattr(prep.ShardWriter, "add", real_add)
    done = prep.prepare_dataset("toy", params(), tmp_path, reader=array_reader())
    calls.clear()
    monkeypatch.setattr(prep.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset("toy", params(image_size=9), tmp_path, reader=array_reader())
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text()) == done
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_stale_partial_from_a_killed_run_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".toy.partial"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half")
    prep.prepare_dataset("toy", params(), tmp_path, reader=array_reader())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_split_sizes_checked_against_official(tmp_path: Path) -> None:
    reader = array_reader(official={"train": 20, "val": 11})
    with pytest.raises(DataError, match=r"'toy' split 'val': expected 11 .*found 10"):
        prep.prepare_dataset("toy", params(), tmp_path, reader=reader)
    with pytest.warns(UserWarning, match="expected 11"):
        manifest = prep.prepare_dataset("toy", params(size_check="warn"), tmp_path, reader=reader)
    assert manifest["official_sizes"]["val"] == {"expected": 11, "found": 10, "matched": False}
    assert manifest["official_sizes"]["train"]["matched"] is True


def test_duplicate_keys_and_odd_keys(tmp_path: Path) -> None:
    img = np.zeros((8, 8), dtype=np.uint8)

    def dup(params: dict) -> RawDataset:
        return RawDataset(["x"], {"train": [Sample("k", img, 0)], "val": [Sample("k", img, 0)]}, "dup")

    with pytest.raises(DataError, match="'k' occurs twice"):
        prep.prepare_dataset("dup", params(), tmp_path, reader=dup)

    def odd(params: dict) -> RawDataset:
        return RawDataset(["x"], {"train": [Sample("a.b/c", img, 0), Sample("a_b_c", img, 0)]}, "odd")

    prep.prepare_dataset("odd", params(), tmp_path, reader=odd)
    ds = PreparedDataset(tmp_path / "odd", "train")
    assert sorted(ds.key(i) for i in range(len(ds))) == ["a_b_c", "a_b_c-1"]


def fake_cli_modules(monkeypatch, tmp_path: Path) -> None:
    """Stand-ins for xtra.config (params loading) and xtra.data.readers (the reader registry)."""
    config = types.ModuleType("xtra.config")
    validated = {**section_defaults("dataset"), **params()}  # what the real load_params returns
    config.load_params = lambda path: {  # type: ignore[attr-defined]
        "paths": {"prepared": str(tmp_path / "prepared")},
        "datasets": {"toy": validated},
    }
    readers = types.ModuleType("xtra.data.readers")
    readers.read_dataset = array_reader()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xtra.config", config)
    monkeypatch.setitem(sys.modules, "xtra.data.readers", readers)


def test_cli_protocol(tmp_path: Path, monkeypatch, capsys) -> None:
    fake_cli_modules(monkeypatch, tmp_path)
    parser = argparse.ArgumentParser()
    prep.configure_parser(parser)
    args = parser.parse_args(["toy"])
    assert args.params == "params.yaml" and args.force is False
    assert prep.run(args) == 0
    assert (tmp_path / "prepared" / "toy" / "manifest.json").is_file()
    assert "prepared toy" in capsys.readouterr().out
    assert prep.run(parser.parse_args(["toy", "--force"])) == 0
    with pytest.raises(ParamsError, match="datasets.nope"):
        prep.run(parser.parse_args(["nope"]))


def test_embedded_digits_end_to_end(tmp_path: Path) -> None:
    """The real reader registry on the embedded scikit-learn digits (no files, no download)."""
    from xtra.data import readers  # the project's own module: an import error fails the test

    assert "digits" in readers.READERS
    manifest = prep.prepare_dataset(
        "digits", {"kind": "digits", "root": None, "image_size": 16, "heldout_fraction": 0.25}, tmp_path
    )
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 1347, "test": 450}
    assert all(check["matched"] for check in manifest["official_sizes"].values())
    x, y = PreparedDataset(tmp_path / "digits", "test")[0]
    assert x.size == (16, 16) and 0 <= y < 10
