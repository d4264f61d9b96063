"""The pretrain stage: loss falls on the demo data, DDP ranks agree, kill + re-run resumes, NaN stops."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import XTRA, demo_params, run_xtra, small_model, write_params
from xtra.config import validate_params
from xtra.errors import CheckpointError


def _params_with(model: dict, **extra_models: dict) -> dict:
    params = demo_params()
    params["models"] = {"m": model, **extra_models}
    return params


def _log(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_loss_falls_on_the_demo_data(tmp_path: Path, prepared_demo: Path) -> None:
    params = _params_with(small_model(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.1, max_steps=200))
    path = write_params(tmp_path, params, prepared_demo)
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    rows = _log(tmp_path / "models" / "m" / "log.csv")
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(5, 201, 5))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, (first, last)
    metrics = json.loads((tmp_path / "models" / "m" / "metrics.json").read_text())
    assert metrics["steps"] == 200 and metrics["images_seen"] == 200 * 32
    assert (tmp_path / "models" / "m" / "reconstruction.png").stat().st_size > 0
    from xtra.model.checkpoint import load_encoder

    encoder, _ = load_encoder(tmp_path / "models" / "m" / "last.ckpt", params["models"]["m"]["arch"])
    assert not encoder.training


@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path: Path, prepared_demo: Path) -> None:
    params = _params_with(small_model(max_steps=6, devices=2, strategy="ddp", reconstruct_images=0))
    path = write_params(tmp_path, params, prepared_demo)
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path, timeout=300)
    out = tmp_path / "models" / "m"
    digests = [p.read_text() for p in sorted((out / "checkpoints").glob("rank-*.sha256"))]
    assert len(digests) == 2 and digests[0] == digests[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] and metrics["steps"] == 6


@pytest.mark.slow
@pytest.mark.faults
def test_killed_run_resumes_at_the_saved_step(tmp_path: Path, prepared_demo: Path) -> None:
    params = _params_with(small_model(max_steps=60, checkpoint_every_n_steps=10, reconstruct_images=0))
    path = write_params(tmp_path, params, prepared_demo)
    out = tmp_path / "models" / "m"
    proc = subprocess.Popen([*XTRA, "pretrain", "m", "--params", str(path)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-000020.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before its checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "last.ckpt").exists() and not (out / "metrics.json").exists()
    second = run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    assert "resuming from" in second.stdout
    resumed_at = int(torch.load(second.stdout.split("resuming from ")[1].split()[0], weights_only=False,
                                map_location="cpu")["global_step"])
    assert resumed_at >= 20
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60
    steps = [int(r["step"]) for r in _log(out / "log.csv")]
    assert steps == list(range(5, 61, 5)), steps  # no gap, no duplicate


@pytest.mark.faults
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, prepared_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xtra.model import xtra as xtra_module
    from xtra.train.pretrain import pretrain_model
    from xtra.train.pretrain_module import NonFiniteLossError

    original = xtra_module.XTRA.loss

    def poisoned(self, images, step=0):
        loss = original(self, images, step)
        return loss * float("nan") if step >= 15 else loss

    monkeypatch.setattr(xtra_module.XTRA, "loss", poisoned)
    params = _params_with(small_model(max_steps=40, checkpoint_every_n_steps=10, reconstruct_images=0))
    write_params(tmp_path, params, prepared_demo)
    params = validate_params(_reload(tmp_path))
    with pytest.raises(NonFiniteLossError, match="at step 15"):
        pretrain_model(params, "m")
    out = tmp_path / "models" / "m"
    assert (out / "checkpoints" / "step-000010.ckpt").exists()
    assert torch.load(out / "checkpoints" / "step-000010.ckpt", weights_only=False)["global_step"] == 10
    assert not (out / "last.ckpt").exists() and not (out / "metrics.json").exists()


def _reload(directory: Path) -> dict:
    import yaml

    return yaml.safe_load((directory / "params.yaml").read_text())


def test_random_control_writes_a_step0_checkpoint(tmp_path: Path) -> None:
    params = _params_with({"init": "random", "arch": small_model()["arch"]})
    path = write_params(tmp_path, params)
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    metrics = json.loads((tmp_path / "models" / "m" / "metrics.json").read_text())
    assert metrics == {"init": "random", "steps": 0, "images_seen": 0, "seed": 0}


def test_truncated_resume_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    from xtra.train.pretrain import find_resume_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save({"hyper_parameters": {"params_hash": "h"}, "global_step": 10}, ckpt_dir / "step-000010.ckpt")
    (ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert find_resume_checkpoint(ckpt_dir, "h") == ckpt_dir / "step-000010.ckpt"
    assert find_resume_checkpoint(ckpt_dir, "other") is None and not ckpt_dir.exists()


def test_unknown_model_and_bad_checkpoint_are_clear_errors(tmp_path: Path) -> None:
    params = _params_with({"init": "random", "arch": small_model()["arch"]})
    path = write_params(tmp_path, params)
    proc = run_xtra("pretrain", "nope", "--params", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "models.nope: no such model" in proc.stderr
    from xtra.model.checkpoint import read_checkpoint

    (tmp_path / "bad.ckpt").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt cannot be read"):
        read_checkpoint(tmp_path / "bad.ckpt")
