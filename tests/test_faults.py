"""Interruptions and faults (README, "Interruptions and faults: what is guaranteed"), end to end.

SIGKILL during prepare and probe, a probe job that keeps crashing under Ray and the report made
after it, corrupt images and a missing split file, bad checkpoints, and a full disk under each
stage's output folder (a tiny tmpfs; inside `unshare -rm` when this user may not mount).
Everything runs on tiny in-memory or on-disk datasets and models, so the file stays fast.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, SMALL_ARCH, XTRA, run_xtra, small_model
from xtra.config import validate_params
from xtra.data.shards import MANIFEST, sha256_file
from xtra.data.source import RawDataset, Sample

pytestmark = pytest.mark.faults

# the probed model: a random-init encoder for 16 px images, trained for nothing, checked for everything
ARCH = {
    "preset": "tiny",
    "width": 32,
    "depth": 2,
    "heads": 2,
    "img_size": 16,
    "patch_size": 4,
    "block_size": 2,
    "predictor_depth": 1,
    "predictor_width": 16,
    "predictor_heads": 1,
}
NUM_CLASSES = 5
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread here and in every `xtra` subprocess: OpenMP spins on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


# ---- the shared workspace: two tiny prepared datasets and a random-init model --------------------


def _array_reader(train: int, test: int, seed: int) -> Callable[[dict], RawDataset]:
    """In-memory 16x16 RGB images whose brightness depends on the class."""

    def read(_params: dict) -> RawDataset:
        rng = np.random.default_rng(seed)
        splits: dict[str, list[Sample]] = {}
        for split, count in (("train", train), ("test", test)):
            samples = []
            for i in range(count):
                label = i % NUM_CLASSES
                pixels = rng.integers(0, 80, size=(16, 16, 3)) + 50 * label
                samples.append(Sample(f"{split}_{i:03d}", pixels.clip(0, 255).astype(np.uint8), label))
            splits[split] = samples
        return RawDataset([f"c{k}" for k in range(NUM_CLASSES)], splits, f"fault-test arrays {seed}")

    return read


@dataclass(frozen=True)
class Workspace:
    root: Path
    params: dict[str, Any]  # validated; paths.results points nowhere useful: each test sets its own

    def params_for(self, tmp: Path, **paths: Path) -> dict[str, Any]:
        """A copy with results (and any other path given) inside the test's own folder."""
        params = copy.deepcopy(self.params)
        params["paths"]["results"] = str(tmp / "results")
        params["paths"].update({key: str(value) for key, value in paths.items()})
        return params


def _write_params(tmp: Path, params: dict[str, Any]) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    import torch

    from xtra.data.prepare import prepare_dataset
    from xtra.model.arch import ArchConfig
    from xtra.model.artifact import save_model_artifact
    from xtra.model.xtra import XTRA

    root = tmp_path_factory.mktemp("faults")
    (root / "raw").mkdir()
    dataset = {"kind": "custom", "root": str(root / "raw"), "image_size": 16, "size_check": "warn", "num_workers": 0}
    pretrained = small_model(
        max_steps=4, batch_size=16, checkpoint_every_n_steps=2, log_every_n_steps=1, reconstruct_images=0
    )
    params = {
        "profile": "test",
        "seed": 0,
        "paths": {"prepared": str(root / "prepared"), "models": str(root / "models"), "results": str(root / "unused")},
        "datasets": {"set_a": dict(dataset), "set_b": dict(dataset)},
        "models": {
            "rand": {"init": "random", "eval_resize": 16, "arch": dict(ARCH)},
            "m": {**pretrained, "dataset": "set_a", "arch": dict(SMALL_ARCH)},
        },
        "probe": {
            "benchmarks": {
                "bench_a": {
                    "dataset": "set_a",
                    "eval_split": "test",
                    "epochs": 2,
                    "batch_size": 16,
                    "lrs": [1e-3],
                    "kinds": ["linear"],
                },
                "bench_b": {
                    "dataset": "set_b",
                    "eval_split": "test",
                    "epochs": 2,
                    "batch_size": 16,
                    "lrs": [1e-3],
                    "kinds": ["linear"],
                },
            },
            "num_last_blocks": 2,
            "attn_heads": 4,
            "augment": False,
            "num_workers": 0,
            "ray": {"max_retries": 1, "cpus_per_job": 1},
        },
    }
    params = validate_params(params, "fault-test params")
    for seed, name in enumerate(("set_a", "set_b")):
        prepare_dataset(name, params["datasets"][name], root / "prepared", reader=_array_reader(40, 20, seed))
    torch.manual_seed(0)
    model_dir = root / "models" / "rand"
    save_model_artifact(
        model_dir / "model.pt", init="random", arch=ARCH, state_dict=XTRA(ArchConfig.from_dict(ARCH)).state_dict()
    )
    (model_dir / "metrics.json").write_text(json.dumps({"init": "random", "steps": 0, "images_seen": 0}))
    return Workspace(root, params)


# ---- small helpers -------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path -> size); {} when the folder does not exist."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_probe_result(path: Path, model: str, benchmark: str, kind: str) -> dict[str, Any]:
    """A whole probe result: valid JSON with every field the report reads."""
    data = json.loads(path.read_text())
    assert (data["model"], data["benchmark"], data["kind"]) == (model, benchmark, kind), path
    assert 0.0 <= data["top1"] <= data["top5"] <= 100.0
    assert data["heads"] and all("top1" in head for head in data["heads"])
    assert data["num_eval"] == 20 and data["wall_time_s"] > 0
    return data


def _shard_digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {shard["file"]: shard["sha256"] for split in manifest["splits"].values() for shard in split["shards"]}


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _write_noise_png(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _class_tree(root: Path, counts: dict[str, int], size: int = 16) -> None:
    """A `custom` dataset of noise PNGs, `root/<split>/k0|k1/<n>.png`, counts[split] images a split."""
    seed = 0
    for split, count in counts.items():
        for i in range(count):
            seed += 1
            _write_noise_png(root / split / f"k{i % 2}" / f"{i:05d}.png", seed, size)


def _with_dataset(params: dict[str, Any], name: str, section: dict[str, Any]) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["datasets"][name] = {"size_check": "warn", "num_workers": 1, **section}
    return params


# ---- SIGKILL during prepare ----------------------------------------------------------------------


@pytest.mark.slow
def test_killed_prepare_leaves_no_finished_folder_and_a_rerun_matches(workspace: Workspace, tmp_path: Path) -> None:
    from xtra.data.prepare import prepare_dataset

    raw = tmp_path / "raw"
    _class_tree(raw, {"train": 600, "val": 20})
    params = _with_dataset(
        workspace.params_for(tmp_path, prepared=tmp_path / "prepared"),
        "big",
        {"kind": "custom", "root": str(raw), "image_size": 16, "shard_size": 50},
    )
    path = _write_params(tmp_path, params)
    prepared = tmp_path / "prepared"
    partial, final = prepared / ".big.partial", prepared / "big"
    proc = subprocess.Popen(
        [*XTRA, "prepare", "big", "--params", str(path)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: (partial / "train-000001.tar").exists(), proc, "a second shard")  # the first is done
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists(), "a killed prepare left a final folder"
    assert partial.is_dir() and not (partial / MANIFEST).exists()  # killed mid-way, with no manifest

    rerun = run_xtra("prepare", "big", "--params", str(path), cwd=tmp_path)
    assert "prepared big" in rerun.stdout
    assert not partial.exists(), "the stale temporary folder was not removed"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["splits"]["train"]["count"] == 600 and manifest["splits"]["val"]["count"] == 20
    for file, digest in _shard_digests(manifest).items():
        assert sha256_file(final / file) == digest
    reference = prepare_dataset(
        "big", validate_params(copy.deepcopy(params), check_paths=False)["datasets"]["big"], tmp_path / "uninterrupted"
    )
    assert _shard_digests(manifest) == _shard_digests(reference)
    assert len(_shard_digests(reference)) == 13


# ---- SIGKILL during probe ------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_probe_leaves_only_whole_results_and_a_rerun_completes(workspace: Workspace, tmp_path: Path) -> None:
    from xtra.probe.driver import ATTEMPT_LOG_ENV

    params = workspace.params_for(tmp_path)
    # the second job trains long enough to be killed inside it
    params["probe"]["benchmarks"]["bench_b"].update(kinds=["attentive"], epochs=600)  # about 2 s
    path = _write_params(tmp_path, params)
    attempts = tmp_path / "attempts.log"
    out = tmp_path / "results" / "probe" / "rand"
    command = [*XTRA, "probe", "rand", "--params", str(path), "--no-ray"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, ATTEMPT_LOG_ENV: str(attempts)},
        )
        try:
            _wait_for(
                lambda: attempts.exists() and len(attempts.read_text().splitlines()) >= 2,
                proc,
                "the second job's start",
            )
            time.sleep(0.3)
        finally:
            _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert attempts.read_text().splitlines() == ["rand/bench_a", "rand/bench_b"]
    assert sorted(_files(out)) == ["bench_a-linear.json"], (tmp_path / "killed.log").read_text()
    _check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")

    rerun = run_xtra("probe", "rand", "--params", str(path), "--no-ray", cwd=tmp_path)
    assert "1 finished job(s) skipped: bench_a" in rerun.stdout and "1/1 job(s) succeeded" in rerun.stdout
    assert sorted(_files(out)) == ["bench_a-linear.json", "bench_b-attentive.json"]
    _check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")
    assert _check_probe_result(out / "bench_b-attentive.json", "rand", "bench_b", "attentive")["epochs"] == 600


# ---- a probe job that crashes under Ray, then the report ------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crashing_ray_job_is_retried_reported_and_marked_in_the_report(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    from xtra.probe.cli import probe_model
    from xtra.probe.driver import ATTEMPT_LOG_ENV, FAIL_ENV
    from xtra.report.cli import build_report

    params = workspace.params_for(tmp_path)
    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(FAIL_ENV, "bench_b")
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    assert probe_model(params, "rand", use_ray=True, num_cpus=2) == 1
    lines = attempts.read_text().splitlines()
    assert sorted(lines) == ["rand/bench_a", "rand/bench_b", "rand/bench_b"]  # one retry
    out = tmp_path / "results" / "probe" / "rand"
    assert sorted(_files(out)) == ["bench_a-linear.json", "failures.json"]
    _check_probe_result(out / "bench_a-linear.json", "rand", "bench_a", "linear")
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert [(f["job"], f["attempts"]) for f in failures] == [("bench_b-linear", 2)]
    assert "InjectedFailure" in failures[0]["error"]

    params["report"].update(figure_formats=["png"], dpi=50)  # read by build_report, not in the schema (yet)
    report = build_report(params, tmp_path / "results")
    long = pd.read_csv(tmp_path / "results" / "tables" / "results_long.csv")
    assert set(long.loc[long["model"] == "m", "status"]) == {"missing"}  # never probed: missing, not failed
    rows = long[long["model"] == "rand"].set_index("benchmark")
    assert rows.loc["bench_a", "status"] == "ok" and 0 <= rows.loc["bench_a", "top1"] <= 100
    assert rows.loc["bench_b", "status"] == "failed" and np.isnan(rows.loc["bench_b", "top1"])
    reason = rows.loc["bench_b", "reason"]
    assert str(out / "failures.json") in reason and "InjectedFailure" in reason
    markdown = (tmp_path / "results" / "tables" / "top1.md").read_text()
    assert "rand / bench_b / linear / paper: failed (" in markdown and "InjectedFailure" in markdown
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["rand"]["linear"]["paper"]["bench_a"] == pytest.approx(rows.loc["bench_a", "top1"], abs=1e-3)
    assert metrics["rand"]["linear"]["paper"].get("bench_b") is None
    assert (tmp_path / "results" / "figures" / "top1_bars.png").stat().st_size > 0
    assert len(report.files) > 10 and not [f for f in _files(tmp_path / "results") if f.endswith(".tmp")]


# ---- corrupt inputs ------------------------------------------------------------------------------


def _bad_tree(root: Path) -> dict[str, tuple[str, str]]:
    """A class-folder dataset with one file of each awkward kind; {key: (file, PIL mode)} of the odd ones."""
    for i in range(3):
        _write_noise_png(root / "train" / "a" / f"ok{i}.png", i)
        _write_noise_png(root / "train" / "b" / f"ok{i}.png", 10 + i)
        _write_noise_png(root / "val" / "a" / f"ok{i}.png", 20 + i)
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


def test_corrupt_images_are_skipped_with_reasons_or_fail_over_the_limit(
    workspace: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from xtra.cli import main
    from xtra.data.loaders import PreparedDataset

    raw = tmp_path / "raw"
    odd = _bad_tree(raw)
    for file, mode in odd.values():  # the fixture is what it claims to be
        assert Image.open(raw / file).mode == mode
    prepared = tmp_path / "prepared"
    section = {"kind": "custom", "root": str(raw), "image_size": 16}

    def prepare(limit: float) -> tuple[int, str]:
        """`xtra prepare bad` through the CLI's entry point, in this process: (exit code, error line)."""
        params = _with_dataset(
            workspace.params_for(tmp_path, prepared=prepared), "bad", {**section, "max_skipped_fraction": limit}
        )
        capsys.readouterr()
        code = main(["prepare", "bad", "--params", str(_write_params(tmp_path, params))])
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
    workspace: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.fixtures.raw import make_food101
    from xtra.cli import main

    info = make_food101(tmp_path / "raw")
    split_file = tmp_path / "raw" / "food-101" / "meta" / "train.json"
    split_file.unlink()
    params = _with_dataset(workspace.params_for(tmp_path, prepared=tmp_path / "prepared"), "food", info.params)
    assert main(["prepare", "food", "--params", str(_write_params(tmp_path, params))]) == 2
    assert capsys.readouterr().err == f"error: missing Food-101 split file: {split_file}\n"
    assert _files(tmp_path / "prepared") == {}


# ---- bad checkpoints -----------------------------------------------------------------------------


def _corrupt(kind: str, ckpt: Path, params: dict[str, Any]) -> str:
    """Spoil the model `rand` one way; returns what the error message must say."""
    import torch

    if kind == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
        return f"model file {ckpt} cannot be read as a weights-only file"
    if kind == "architecture":
        params["models"]["rand"]["arch"]["depth"] = 3
        return f"{ckpt} has a different architecture than params: depth: checkpoint 2 vs params 3"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = "encoder.blocks.1.mlp.fc1.weight"
    assert key in state["state_dict"]
    del state["state_dict"][key]
    torch.save(state, ckpt)
    return f"{ckpt} (encoder) does not match the architecture: missing keys: ['blocks.1.mlp.fc1.weight']"


@pytest.mark.parametrize("kind", ["truncated", "architecture", "missing_keys"])
def test_bad_checkpoint_is_refused_before_any_job(
    kind: str, workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from xtra.cli import main
    from xtra.probe.driver import ATTEMPT_LOG_ENV

    models = tmp_path / "models"
    shutil.copytree(workspace.root / "models" / "rand", models / "rand")
    params = workspace.params_for(tmp_path, models=models)
    expected = _corrupt(kind, models / "rand" / "model.pt", params)
    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    code = main(["probe", "rand", "--params", str(_write_params(tmp_path, params)), "--no-ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {expected}"), err
    assert not attempts.exists(), "a probe job started"
    assert _files(tmp_path / "results") == {}


# ---- a full disk under each stage's output -------------------------------------------------------


@dataclass(frozen=True)
class SmallDiskRun:
    returncode: int
    stdout: str
    stderr: str
    files: dict[str, int]  # what the small file system holds after the run, filler excluded


FILLER = ".filler"


@functools.lru_cache(maxsize=1)
def _tmpfs_mode() -> tuple[str, str]:
    """("mount" | "unshare" | "", why neither works): how this machine gives a test a tiny tmpfs."""
    probe = Path(tempfile.mkdtemp(prefix="xtra-tmpfs-"))
    mount = ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(probe)]
    try:
        if shutil.which("mount") is None:
            return "", "no mount command"
        direct = subprocess.run(mount, capture_output=True, text=True)
        if direct.returncode == 0:
            subprocess.run(["umount", str(probe)], check=True)
            return "mount", ""
        if shutil.which("unshare") is None:
            return "", f"mount: {direct.stderr.strip()}; no unshare command"
        nested = subprocess.run(["unshare", "-rm", *mount], capture_output=True, text=True)
        if nested.returncode == 0:
            return "unshare", ""
        return "", f"mount: {direct.stderr.strip()}; unshare -rm: {nested.stderr.strip()}"
    finally:
        probe.rmdir()


def _fill(place: Path, free_kb: int) -> None:
    """Fill the file system of `place` with a filler file, then give `free_kb` back."""
    filler = place / FILLER
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - free_kb * 1024))


def _run_small_disk(spec: dict[str, Any]) -> SmallDiskRun:
    """Mount a tmpfs on spec["place"], copy spec["seed"] in, fill it, run the command, list, unmount."""
    place = Path(spec["place"])
    place.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size_kb']}k", "tmpfs", str(place)], check=True)
    try:
        if spec["seed"]:
            shutil.copytree(spec["seed"], place, dirs_exist_ok=True)
        if spec["free_kb"] is not None:
            _fill(place, spec["free_kb"])
        proc = subprocess.run(
            spec["command"],
            cwd=spec["cwd"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        files = {name: size for name, size in _files(place).items() if name != FILLER}
        return SmallDiskRun(proc.returncode, proc.stdout, proc.stderr, files)
    finally:
        subprocess.run(["umount", str(place)], check=True)


def _run_small_disk_from_file(spec_file: str) -> None:
    """The body of the `unshare -rm` fallback: run the spec, write the result beside it."""
    spec = json.loads(Path(spec_file).read_text())
    Path(spec["result"]).write_text(json.dumps(_run_small_disk(spec).__dict__))


def run_on_small_disk(
    args: Sequence[str], cwd: Path, place: Path, size_kb: int, free_kb: int | None = None, seed: Path | None = None
) -> SmallDiskRun:
    """`xtra ARGS` with `place` on a `size_kb` tmpfs holding a copy of `seed`, filled to `free_kb` free."""
    mode, why = _tmpfs_mode()
    if not mode:
        pytest.skip(f"cannot mount a tmpfs here, directly or in a user namespace: {why}")
    spec = {
        "place": str(place),
        "size_kb": size_kb,
        "free_kb": free_kb,
        "seed": str(seed) if seed else None,
        "command": [*XTRA, *args],
        "cwd": str(cwd),
        "result": str(cwd / "small-disk-result.json"),
    }
    if mode == "mount":
        try:
            return _run_small_disk(spec)
        finally:
            if os.path.ismount(place):  # only when the unmount inside failed (a busy file system)
                subprocess.run(["umount", "-l", str(place)], check=False)
    spec_file = cwd / "small-disk-spec.json"
    spec_file.write_text(json.dumps(spec))
    code = f"import sys; from tests.test_faults import _run_small_disk_from_file as run; run({str(spec_file)!r})"
    inner = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert inner.returncode == 0, f"the unshare -rm runner failed:\n{inner.stdout}\n{inner.stderr}"
    return SmallDiskRun(**json.loads(Path(spec["result"]).read_text()))


def _assert_clean_failure(run: SmallDiskRun, place: Path) -> None:
    """Exit 2, one `error:` line naming `place` and the full disk (and no file elsewhere), no traceback."""
    assert run.returncode == 2, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert str(place) in errors[0] and NO_SPACE in errors[0], errors[0]
    named = re.findall(r"/[^\s():']+", errors[0])
    assert all(Path(path).is_relative_to(place) for path in named), f"names a file outside {place}: {errors[0]}"


def _no_tmp(files: dict[str, int]) -> None:
    assert not [name for name in files if ".tmp" in name or ".partial" in name], files


def test_full_disk_during_prepare(workspace: Workspace, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _class_tree(raw, {"train": 60, "val": 10}, size=32)  # ~3 KB a PNG: ~210 KB of shards
    prepared = tmp_path / "prepared"
    params = _with_dataset(
        workspace.params_for(tmp_path, prepared=prepared),
        "full",
        {"kind": "custom", "root": str(raw), "image_size": 32, "shard_size": 20, "num_workers": 2},
    )
    run = run_on_small_disk(
        ["prepare", "full", "--params", str(_write_params(tmp_path, params))], tmp_path, prepared, size_kb=128
    )
    _assert_clean_failure(run, prepared / "full")
    assert run.files == {}, "a failed prepare left files behind"


# m trains and fills the disk at its first periodic checkpoint (step 2, over 1 MB), leaving only its
# log; rand is the random-init control, whose one checkpoint (about 360 KB) does not fit
@pytest.mark.slow
@pytest.mark.parametrize(("model", "size_kb", "left"), [("m", 512, {"m/log.csv"}), ("rand", 128, set())])
def test_full_disk_during_pretrain(
    workspace: Workspace, tmp_path: Path, model: str, size_kb: int, left: set[str]
) -> None:
    models = tmp_path / "models"
    params = workspace.params_for(tmp_path, models=models)
    run = run_on_small_disk(
        ["pretrain", model, "--params", str(_write_params(tmp_path, params))], tmp_path, models, size_kb=size_kb
    )
    _assert_clean_failure(run, models / model)
    _no_tmp(run.files)
    assert set(run.files) == left, f"a failed pretrain left {sorted(run.files)}"


def test_full_disk_during_probe(workspace: Workspace, tmp_path: Path) -> None:
    results = tmp_path / "results"
    params = workspace.params_for(tmp_path)
    args = ["probe", "rand", "--params", str(_write_params(tmp_path, params)), "--no-ray"]
    run = run_on_small_disk(args, tmp_path, results, size_kb=64, free_kb=0)
    _assert_clean_failure(run, results / "probe-state" / "rand" / "bench_a")  # the job's first file: its state
    assert "[rand/bench_a] kinds ['linear']: 1 heads" in run.stdout  # the job ran; only its files could not be written
    assert run.files == {}, f"a failed probe left {sorted(run.files)}"


def test_full_disk_during_report(workspace: Workspace, tmp_path: Path) -> None:
    from xtra.probe.cli import probe_model

    staged = tmp_path / "staged"
    assert probe_model(workspace.params_for(tmp_path, results=staged), "rand", use_ray=False) == 0
    probe_files = _files(staged)
    assert {"probe/rand/bench_a-linear.json", "probe/rand/bench_b-linear.json"} <= set(probe_files)
    results = tmp_path / "results"
    params = workspace.params_for(tmp_path)
    args = ["report", "--params", str(_write_params(tmp_path, params)), "--readme", ""]
    run = run_on_small_disk(args, tmp_path, results, size_kb=64, free_kb=0, seed=staged)
    _assert_clean_failure(run, results / "tables")
    assert run.files == probe_files, f"a failed report left {sorted(set(run.files) - set(probe_files))}"
