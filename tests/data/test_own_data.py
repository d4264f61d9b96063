"""A user's own class-folder data prepared right: links and loops, odd names, colour profiles, deep PNGs,
and every file that is not a sample accounted for (issue 24, items 1-3). The tree is built by the test
(tests/fixtures/own_data.py); `xtra prepare` runs through the CLI's entry point, in this process."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageCms

from tests.conftest import REPO
from tests.fixtures.own_data import TWELVE_BIT_TOP, OwnData, make_own_data, profile_aware
from xtra.data.fingerprint import tree_fingerprint
from xtra.data.images import convert_image, to_rgb
from xtra.data.prepare import FAILED_LIST
from xtra.data.prepared import PreparedDataset
from xtra.data.readers import read_dataset
from xtra.data.readers.common import NotTaken, make_key, unique_keys


@pytest.fixture
def own(tmp_path: Path) -> OwnData:
    return make_own_data(tmp_path / "raw", tmp_path / "store")


def _params_file(tmp_path: Path, root: Path, **section: object) -> Path:
    """The repository's params.yaml with the dataset `own` (the tree at `root`) and prepared data under tmp_path."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"]["prepared"] = str(tmp_path / "prepared")
    params["datasets"]["own"] = {"kind": "custom", "root": str(root), "image_size": 0, "num_workers": 1, **section}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return path


def _xtra(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`xtra ARGV` in this process: (exit code, stdout, stderr)."""
    from xtra.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _relative(own: OwnData, source: str) -> str:
    return Path(source).relative_to(own.root).as_posix()


def test_the_walk_lists_every_sample_once_under_its_class_and_every_other_file_with_its_reason(own: OwnData) -> None:
    raw = read_dataset({"kind": "custom", "root": str(own.root)})
    assert raw.classes == own.classes
    listed = [
        (_relative(own, str(s.image)), split, raw.classes[s.label]) for split in raw.splits for s in raw.splits[split]
    ]
    paths = collections.Counter(rel for rel, _, _ in listed)
    assert [rel for rel, n in paths.items() if n > 1] == []  # the loops list nothing twice
    assert {rel: (split, cls) for rel, split, cls in listed} == own.samples  # each under its own class
    not_taken = [entry for entry in raw.skipped if isinstance(entry, NotTaken)]
    assert len(not_taken) == len(raw.skipped)  # nothing dropped that is not a file with a reason
    reasons = {_relative(own, entry.source): entry.reason for entry in not_taken}
    assert len(reasons) == len(not_taken) and set(reasons) == set(own.not_taken)
    for rel, phrase in own.not_taken.items():
        assert phrase in reasons[rel], (rel, reasons[rel])
    # unique keys; keys unique by themselves keep their old form, the colliding ones differ by a hash
    keys = {_relative(own, str(s.image)): s.key for samples in raw.splits.values() for s in samples}
    assert len(set(keys.values())) == len(keys)
    assert keys["train/cat/a.png"] == "train_cat_a_png" and keys["train/cat/sub/b.png"] == "train_cat_sub_b_png"
    for a, b in (("train/cat/猫.png", "train/cat/犬.png"), ("train/cat/photo 1.png", "train/cat/photo_1.png")):
        assert make_key(a) == make_key(b) and keys[a] != keys[b] and keys[a].startswith(make_key(a) + "_")


def test_unique_keys_change_only_colliding_keys() -> None:
    paths = ["t/c/a.png", "t/c/猫.png", "t/c/犬.png", "t/c/photo 1.png", "t/c/photo_1.png", "t/c/photo_2.png"]
    keys = unique_keys(paths)
    assert keys[0] == "t_c_a_png" and keys[5] == "t_c_photo_2_png"
    assert len(set(keys)) == len(keys) and unique_keys(list(reversed(paths))) == list(reversed(keys))


def test_the_tree_fingerprint_walks_loops_and_dangling_links_without_failing(own: OwnData) -> None:
    digest, files = tree_fingerprint(own.root)
    assert tree_fingerprint(own.root) == (digest, files)
    assert files < 40  # the loops are walked once, not to the kernel's link limit
    os.symlink("loop_a.png", own.root / "train" / "cat" / "loop_c.png")  # a new link counts
    assert tree_fingerprint(own.root)[0] != digest


def test_prepare_finishes_with_right_colours_and_every_file_accounted_for(
    own: OwnData, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = _params_file(tmp_path, own.root)
    code, out, err = _xtra(capsys, "prepare", "own", "--params", str(params))
    assert code == 0, err
    folder = tmp_path / "prepared" / "own"
    manifest = json.loads((folder / "manifest.json").read_text())
    listing = read_dataset({"kind": "custom", "root": str(own.root)})
    path_of = {s.key: _relative(own, str(s.image)) for samples in listing.splits.values() for s in samples}
    prepared = {split: PreparedDataset(folder, split) for split in ("train", "val")}
    stored = {
        path_of[ds.key(i)]: (split, manifest["classes"][int(ds.targets[i])])
        for split, ds in prepared.items()
        for i in range(len(ds))
    }
    assert stored == own.samples and sum(len(ds) for ds in prepared.values()) == len(own.samples)
    assert manifest["skipped"] == [] and manifest["skipped_fraction"] == 0.0
    not_taken = {_relative(own, e["source"]): e["reason"] for e in manifest["not_taken"]}
    assert set(not_taken) == set(own.not_taken)
    assert {_relative(own, e["source"]) for e in manifest["notes"]} == own.noted

    images = {path_of[ds.key(i)]: ds.image(i) for ds in prepared.values() for i in range(len(ds))}
    # the CMYK JPEG with a profile: within a few levels of ImageCms's conversion, far from PIL's plain one
    reference = profile_aware(own.root / "train" / "cat" / "print.jpg", own.icc).astype(float)
    got = np.asarray(images["train/cat/print.jpg"]).astype(float)
    assert np.abs(got - reference).mean(axis=(0, 1)).max() < 2.0 and np.abs(got - reference).max() <= 8
    with Image.open(own.root / "train" / "cat" / "print.jpg") as img:
        plain = np.asarray(img.convert("RGB")).astype(float)
    assert np.abs(plain - reference).mean(axis=(0, 1)).min() > 10.0  # the check can fail
    # 12-bit data in 16-bit PNGs: scaled by the sBIT chunk's 12 bits; without it, converted as before with a note
    ramp = np.linspace(0, TWELVE_BIT_TOP, 24 * 32).round().reshape(24, 32)  # the values the files hold
    deep = np.asarray(images["train/cat/deep12.png"].convert("L")).astype(float)
    assert np.abs(deep - ramp * 255 / TWELVE_BIT_TOP).max() <= 0.5 + 1e-9
    dark = np.asarray(images["train/cat/deep12_nosbit.png"].convert("L")).astype(float)
    assert np.abs(dark - ramp * 255 / 65535).max() <= 0.5 + 1e-9
    (note,) = [e["reason"] for e in manifest["notes"]]
    assert "below 4096" in note and "sBIT" in note

    # the summary names the first files not taken; --explain prints every one of them, preparing nothing
    assert f"not taken {len(own.not_taken)}" in out and str(own.root / ".DS_Store") in out and "--explain" in out
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, out, err = _xtra(capsys, "prepare", "own", "--params", str(params), "--explain")
    assert code == 0, err
    for rel, reason in not_taken.items():
        assert f"{own.root / rel}: {reason}" in out
    assert str(own.root / "train" / "cat" / "deep12_nosbit.png") in out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_failed_prepare_keeps_the_last_manifest_and_lists_every_reason_beside_it(
    own: OwnData, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = _params_file(tmp_path, own.root, max_skipped_fraction=0.0)
    assert _xtra(capsys, "prepare", "own", "--params", str(params))[0] == 0
    folder = tmp_path / "prepared" / "own"
    good = (folder / "manifest.json").read_bytes()
    cat = own.root / "train" / "cat"
    broken = {name: cat / name for name in ("random.png", "truncated.jpg", "empty.webp")}
    broken["random.png"].write_bytes(np.random.default_rng(0).bytes(600))
    broken["truncated.jpg"].write_bytes((cat / "print.jpg").read_bytes()[:900])
    broken["empty.webp"].write_bytes(b"")

    code, _, err = _xtra(capsys, "prepare", "own", "--params", str(params))
    failed = folder / FAILED_LIST
    assert (
        code == 2
        and f"3 of {len(own.samples) + 3} samples skipped" in err
        and str(failed) in err
        and "--explain" in err
    )
    assert all(str(path) in err for path in broken.values())  # the first few files are named
    assert (folder / "manifest.json").read_bytes() == good  # the last good preparation is kept
    record = json.loads(failed.read_text())
    assert {Path(e["source"]).name for e in record["skipped"]} == set(broken)
    assert all(e["stage"] == "decode" for e in record["skipped"])
    assert {_relative(own, e["source"]) for e in record["not_taken"]} == set(own.not_taken)

    code, out, _ = _xtra(capsys, "prepare", "own", "--params", str(params), "--explain")
    assert code == 0 and "the last prepare failed" in out
    assert all(str(path) in out for path in broken.values())
    assert all(str(own.root / rel) in out for rel in own.not_taken)

    for path in broken.values():
        path.unlink()
    code, out, _ = _xtra(capsys, "prepare", "own", "--params", str(params))
    assert code == 0 and "up to date" in out and not failed.exists()  # the failure no longer holds
    assert (folder / "manifest.json").read_bytes() == good


def test_profiles_that_cannot_apply_are_noted_and_alpha_is_kept_through_a_profile(tmp_path: Path) -> None:
    from tests.fixtures.own_data import cmyk_profile

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 30, 40, 255)  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png", icc_profile=srgb)
    converted = convert_image(tmp_path / "rgba.png", 0, False)
    image = Image.open(io.BytesIO(converted.data))
    assert converted.note is None and "icc_profile" not in image.info
    assert image.getpixel((1, 1)) == (200, 30, 40) and image.getpixel((6, 1)) == (255, 255, 255)

    Image.new("RGB", (8, 8), (10, 120, 250)).save(tmp_path / "wrong.png", icc_profile=cmyk_profile(grid=2))
    converted = convert_image(tmp_path / "wrong.png", 0, False)
    image = Image.open(io.BytesIO(converted.data))
    assert "ICC profile not applied" in converted.note and "CMYK" in converted.note
    assert image.getpixel((0, 0)) == (10, 120, 250) and "icc_profile" not in image.info


def test_sixteen_bit_colour_pngs_with_twelve_bits_are_noted(tmp_path: Path) -> None:
    import struct
    import zlib

    from PIL.PngImagePlugin import PngInfo

    # a 48-bit PNG written by hand (Pillow writes no 16-bit colour): 12-bit values, with an sBIT of 12
    values = np.full((4, 4, 3), 3000, dtype=">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in values)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "sbit.png").write_bytes(head + chunk(b"sBIT", bytes([12, 12, 12])) + tail)
    (tmp_path / "plain.png").write_bytes(head + tail)
    for name, phrase in (("sbit.png", "12 significant bits"), ("plain.png", "below 4096")):
        converted = convert_image(tmp_path / name, 0, False)
        assert converted.note is not None and phrase in converted.note, converted.note
    Image.new("RGB", (4, 4), (250, 0, 0)).save(tmp_path / "eight.png", pnginfo=PngInfo())
    assert convert_image(tmp_path / "eight.png", 0, False).note is None
    assert to_rgb(Image.new("RGB", (2, 2)))[1] == []
