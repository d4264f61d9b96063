"""Faults of the prepare stage: SIGKILL mid-way, corrupt images and a missing split file, a full disk."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import XTRA, run_xtra
from tests.fixtures.faults import (
    Workspace,
    assert_clean_failure,
    class_tree,
    files_under,
    kill,
    run_on_small_disk,
    shard_digests,
    wait_for,
    with_dataset,
    write_noise_png,
    write_params_file,
)
from xtra.atomic import sha256_file
from xtra.config import validate_params
from xtra.data.shards import MANIFEST

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


def _bad_tree(root: Path) -> dict[str, tuple[str, str]]:
    """A class-folder dataset with one file of each awkward kind; {key: (file, PIL mode)} of the odd ones."""
    for i in range(3):
        write_noise_png(root / "train" / "a" / f"ok{i}.png", i)
        write_noise_png(root / "train" / "b" / f"ok{i}.png", 10 + i)
        write_noise_png(root / "val" / "a" / f"ok{i}.png", 20 + i)
    a, b = root / "train" / "a", root / "train" / "b"
    big = np.random.default_rng(5).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(big).save(a / "whole.jpg", quality=90)
    (a / "truncated.jpg").write_bytes((a / "whole.jpg").read_bytes()[:700])
    (a / "whole.jpg").unlink()
    (a / "random.jpg").write_bytes(np.random.default_rng(6).bytes(900))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(a / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(b / "deep.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(b / "palette.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    Image.new("L", (16, 16), 90).save(b / "grey.png")
    (root / "val" / "b").mkdir(parents=True)  # an empty class folder
    odd = {
        "train/a/cmyk.jpg": "CMYK",
        "train/b/deep.png": "I;16",
        "train/b/palette.png": "P",
        "train/b/rgba.png": "RGBA",
        "train/b/grey.png": "L",
    }
    return {file.replace("/", "_").replace(".", "_"): (file, mode) for file, mode in odd.items()}


@pytest.mark.slow
def test_killed_prepare_leaves_no_finished_folder_and_a_rerun_matches(
    fault_workspace: Workspace, tmp_path: Path
) -> None:
    from xtra.data.prepare import prepare_dataset

    raw = tmp_path / "raw"
    class_tree(raw, {"train": 600, "val": 20})
    params = with_dataset(
        fault_workspace.params_for(tmp_path, prepared=tmp_path / "prepared"),
        "big",
        {"kind": "custom", "root": str(raw), "image_size": 16, "shard_size": 50},
    )
    path = write_params_file(tmp_path, params)
    prepared = tmp_path / "prepared"
    partial, final = prepared / ".big.partial", prepared / "big"
    proc = subprocess.Popen(
        [*XTRA, "prepare", "big", "--params", str(path)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (partial / "train-000001.tar").exists(), proc, "a second shard")  # the first is done
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists(), "a killed prepare left a final folder"
    assert partial.is_dir() and not (partial / MANIFEST).exists()  # killed mid-way, with no manifest

    rerun = run_xtra("prepare", "big", "--params", str(path), cwd=tmp_path)
    assert "prepared big" in rerun.stdout
    assert not partial.exists(), "the stale temporary folder was not removed"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["splits"]["train"]["count"] == 600 and manifest["splits"]["val"]["count"] == 20
    for file, digest in shard_digests(manifest).items():
        assert sha256_file(final / file) == digest
    reference = prepare_dataset(
        "big", validate_params(copy.deepcopy(params), check_paths=False)["datasets"]["big"], tmp_path / "uninterrupted"
    )
    assert shard_digests(manifest) == shard_digests(reference)
    assert len(shard_digests(reference)) == 13


def test_corrupt_images_are_skipped_with_reasons_or_fail_over_the_limit(
    fault_workspace: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from xtra.cli import main
    from xtra.data.prepared import PreparedDataset

    raw = tmp_path / "raw"
    odd = _bad_tree(raw)
    for file, mode in odd.values():  # the fixture is what it claims to be
        assert Image.open(raw / file).mode == mode
    prepared = tmp_path / "prepared"
    section = {"kind": "custom", "root": str(raw), "image_size": 16}

    def prepare(limit: float) -> tuple[int, str]:
        """`xtra prepare bad` through the CLI's entry point, in this process: (exit code, error line)."""
        params = with_dataset(
            fault_workspace.params_for(tmp_path, prepared=prepared), "bad", {**section, "max_skipped_fraction": limit}
        )
        capsys.readouterr()
        code = main(["prepare", "bad", "--params", str(write_params_file(tmp_path, params))])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        return code, "\n".join(errors)

    # refused after decoding: the two broken files; the empty class folder is listed, not a skipped sample
    code, error = prepare(0.0)
    assert code == 2 and error.startswith("error: dataset 'bad': 2 of 16 samples skipped (12.50%)"), error
    assert f"train: {raw / 'train' / 'a' / 'random.jpg'}: UnidentifiedImageError" in error
    assert f"train: {raw / 'train' / 'a' / 'truncated.jpg'}: OSError" in error
    assert "max_skipped_fraction 0.0" in error and str(prepared / "bad" / "failed-prepare.json") in error
    assert [p.name for p in (prepared / "bad").iterdir()] == ["failed-prepare.json"]  # the reasons, no dataset

    code, error = prepare(0.5)
    assert code == 0 and error == ""
    manifest = json.loads((prepared / "bad" / MANIFEST).read_text())
    reasons = {Path(s["source"]).name: (s["stage"], s["reason"]) for s in manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "random.jpg"}
    assert reasons["truncated.jpg"][0] == "decode" and "truncated" in reasons["truncated.jpg"][1]
    assert reasons["random.jpg"][0] == "decode" and "cannot identify image file" in reasons["random.jpg"][1]
    assert manifest["not_taken"] == [
        {"split": "val", "source": str(raw / "val" / "b"), "reason": "empty class folder (no image files)"}
    ]
    assert manifest["skipped_fraction"] == pytest.approx(2 / 16)
    assert not (prepared / "bad" / "failed-prepare.json").exists()
    assert manifest["splits"]["train"]["count"] == 11 and manifest["splits"]["val"]["count"] == 3
    train = PreparedDataset(prepared / "bad", "train")
    images = {train.key(i): train.image(i) for i in range(len(train))}
    assert set(odd) <= set(images) and all(image.mode == "RGB" for image in images.values())
    assert images["train_b_grey_png"].getpixel((3, 3)) == (90, 90, 90)
    assert images["train_b_rgba_png"].getpixel((12, 3)) == (255, 255, 255)  # transparent -> white
    assert images["train_b_deep_png"].getpixel((3, 3)) == (156, 156, 156)  # 40000 * 255 / 65535
    red, green, blue = images["train_a_cmyk_jpg"].getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60


def test_missing_split_file_is_an_error_naming_it(
    fault_workspace: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.fixtures.raw import make_food101
    from xtra.cli import main

    info = make_food101(tmp_path / "raw")
    split_file = tmp_path / "raw" / "food-101" / "meta" / "train.json"
    split_file.unlink()
    params = with_dataset(fault_workspace.params_for(tmp_path, prepared=tmp_path / "prepared"), "food", info.params)
    assert main(["prepare", "food", "--params", str(write_params_file(tmp_path, params))]) == 2
    assert capsys.readouterr().err == f"error: missing Food-101 split file: {split_file}\n"
    assert files_under(tmp_path / "prepared") == {}


def test_full_disk_during_prepare(fault_workspace: Workspace, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw, {"train": 60, "val": 10}, size=32)  # ~3 KB a PNG: ~210 KB of shards
    prepared = tmp_path / "prepared"
    params = with_dataset(
        fault_workspace.params_for(tmp_path, prepared=prepared),
        "full",
        {"kind": "custom", "root": str(raw), "image_size": 32, "shard_size": 20, "num_workers": 2},
    )
    run = run_on_small_disk(
        ["prepare", "full", "--params", str(write_params_file(tmp_path, params))], tmp_path, prepared, size_kb=128
    )
    assert_clean_failure(run, prepared / "full")
    assert run.files == {}, "a failed prepare left files behind"
