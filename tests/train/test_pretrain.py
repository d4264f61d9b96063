"""The pretrain stage: loss falls on the demo data, DDP ranks agree, run identity, schedule, artifacts."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_params, run_xtra, small_model, write_params
from tests.fixtures.pretrain import TINY_ARCH, run_pretrain, tiny_params
from xtra.config import validate_params
from xtra.errors import CheckpointError, ParamsError


def _params_with(model: dict, **extra_models: dict) -> dict:
    params = demo_params()
    params["models"] = {"m": model, **extra_models}
    return params


def _log(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_loss_falls_on_the_demo_data(tmp_path: Path, prepared_demo: Path) -> None:
    params = _params_with(
        small_model(
            epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.1, max_steps=200, val_every_n_steps=100, val_batches=2
        )
    )
    path = write_params(tmp_path, params, prepared_demo)
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    out = tmp_path / "models" / "m"
    rows = _log(out / "log.csv")
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(5, 201, 5))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, (first, last)
    assert [int(r["step"]) for r in _log(out / "val.csv")] == [100, 200]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 200 and metrics["images_seen"] == 200 * 32
    assert (out / "reconstruction.png").stat().st_size > 0


def test_run_writes_its_plan_logs_and_a_weights_only_model(small, tmp_path: Path) -> None:
    """run.json + the printed summary, log/val CSVs with the visibility columns, TensorBoard, model.pt."""
    from xtra.model.artifact import read_model_artifact
    from xtra.model.checkpoint import load_strict
    from xtra.model.xtra import ArchConfig, build_arch_encoder

    tmp, prepared = small
    params = tiny_params(
        tmp, prepared, epochs=1, val_every_n_steps=3, val_batches=1, keep_last_checkpoints=1, checkpoint_every_n_steps=2
    )
    stdout = _ok(run_pretrain(tmp_path, params, prepared))
    out = tmp_path / "models" / "m"
    plan = json.loads((out / "run.json").read_text())
    assert plan["world_size"] == 1 and plan["steps_per_epoch"] == 6 and plan["total_steps"] == 6
    assert plan["global_batch"] == 4 and plan["warmup_steps"] == 3 and plan["resume_from"] is None
    assert plan["attention"] == "sdpa" and plan["parameters"]["encoder"] > 0
    assert f"run {plan['run_id']} on 1 process(es)" in stdout and "warm-up 3, total 6 steps" in stdout
    rows = _log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["grad_norm"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert [int(r["step"]) for r in _log(out / "val.csv")] == [3, 6]
    assert list((out / "tb" / plan["run_id"]).glob("events.out.tfevents.*"))
    run_dir = Path(plan["run_dir"])
    assert sorted(p.name for p in run_dir.glob("step-*.ckpt")) == ["step-000006.ckpt"]  # keep_last_checkpoints 1
    assert list(out.rglob("*.ckpt")) == [run_dir / "step-000006.ckpt"]  # and no other checkpoint anywhere
    artifact = read_model_artifact(out / "model.pt")
    assert artifact.init == "pretrain" and artifact.provenance["steps"] == 6
    # the environment (issue 26): one segment, the thread count the run had (OMP_NUM_THREADS=1 here)
    (segment,) = artifact.provenance["environments"]
    env = segment["environment"]
    assert segment["from_step"] == 0 and (env["threads"], env["ranks"], env["device"]) == (1, 1, "cpu")
    assert env["device_name"] and env["torch"] == torch.__version__ and plan["environment"] == env
    assert json.loads((out / "metrics.json").read_text())["environments"] == artifact.provenance["environments"]
    encoder = build_arch_encoder(ArchConfig.from_dict(artifact.arch))
    load_strict(
        encoder,
        {k[len("encoder.") :]: v for k, v in artifact.state_dict.items() if k.startswith("encoder.")},
        "model.pt",
    )
    assert not any(k.startswith("optimizer") for k in artifact.state_dict)


def _sha(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.ckpt"))
    }


@pytest.mark.slow
def test_non_trajectory_edits_resume_and_an_lr_edit_leaves_the_old_checkpoints_byte_for_byte(
    small, tmp_path: Path
) -> None:
    from xtra.data.prepare import prepare_dataset

    tmp, prepared = small
    base = tiny_params(tmp, prepared, epochs=1, max_steps=2)
    _ok(run_pretrain(tmp_path, base, prepared))
    plan = json.loads((tmp_path / "models" / "m" / "run.json").read_text())
    edited = tiny_params(
        tmp, prepared, epochs=1, max_steps=4, log_every_n_steps=2, checkpoint_every_n_steps=1, reconstruct_images=1
    )
    edited["models"]["m"]["arch"]["attn_impl"] = "reference"
    edited["datasets"]["small"].update(num_workers=2, resources={"cpus": 3})
    reprepared = tmp_path / "prepared-again"  # the dataset's num_workers / resources edited: the same bytes
    prepare_dataset("small", validate_params(edited, check_paths=False)["datasets"]["small"], reprepared)
    shards = [
        [
            (s["file"], s["sha256"])
            for s in json.loads((root / "small" / "manifest.json").read_text())["splits"]["train"]["shards"]
        ]
        for root in (prepared, reprepared)
    ]
    assert shards[0] == shards[1]
    stdout = _ok(run_pretrain(tmp_path, edited, reprepared))
    assert "resuming from" in stdout and "step-000002.ckpt" in stdout and f"run {plan['run_id']}" in stdout
    before = _sha(tmp_path / "models" / "m" / "checkpoints")
    changed = tiny_params(tmp, prepared, epochs=1, max_steps=2, lr=5e-4)
    stdout = _ok(run_pretrain(tmp_path, changed, prepared))
    assert "starting afresh" in stdout and "train.lr: 0.001 -> 0.0005" in stdout
    after = _sha(tmp_path / "models" / "m" / "checkpoints")
    assert {k: after[k] for k in before} == before  # the earlier run's checkpoints, byte for byte
    assert len(after) > len(before)  # the new run's beside them


def test_a_forced_rerun_of_a_finished_pretraining_changes_no_byte(small, tmp_path: Path) -> None:
    """A finished run asked again trains nothing: with its final files deleted (DVC deletes a stage's
    outputs before its command) model.pt and metrics.json come back byte for byte from the final
    checkpoint; with them present (Snakemake's retry, a params edit of no consequence) they are left
    untouched. The probe stages' inputs (metrics.json, the manifest) and the identity of their jobs are
    unchanged, so both front-ends and the probe command keep them up to date."""
    from xtra.probe.job import ProbeJob, job_identity

    tmp, prepared = small
    params = tiny_params(tmp, prepared, epochs=1)
    params["probe"]["benchmarks"] = {"small": {"dataset": "small", "eval_split": "val", "kinds": ["linear"]}}
    _ok(run_pretrain(tmp_path, params, prepared))
    out = tmp_path / "models" / "m"
    finals = (out / "model.pt", out / "metrics.json")
    before = {p: p.read_bytes() for p in finals}
    validated = validate_params({**params, "paths": {**params["paths"], "prepared": str(prepared)}}, check_paths=False)
    validated["paths"].update(models=str(tmp_path / "models"), results=str(tmp_path / "results"))
    job = ProbeJob("m", "small", ("linear",))
    probe_identity = job_identity(validated, job)
    for path in finals:
        path.unlink()
    stdout = _ok(run_pretrain(tmp_path, params, prepared))
    assert "nothing to train" in stdout and "resuming" not in stdout
    assert {p: p.read_bytes() for p in finals} == before
    times = {p: p.stat().st_mtime_ns for p in finals}
    edited = tiny_params(tmp, prepared, epochs=1, val_every_n_steps=3, reconstruct_images=1, log_every_n_steps=2)
    stdout = _ok(run_pretrain(tmp_path, edited, prepared))
    assert "left untouched" in stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finals} == {p: (before[p], times[p]) for p in finals}
    assert job_identity(validated, job) == probe_identity
    metrics = json.loads(before[out / "metrics.json"])
    assert metrics["final_loss"] is not None and "wall_time_s" not in metrics
    assert metrics["identity"] == read_model_artifact_identity(out / "model.pt")


def read_model_artifact_identity(path: Path) -> str:
    from xtra.model.artifact import read_model_artifact

    return read_model_artifact(path).provenance["identity"]


def test_a_longer_run_continues_in_a_new_segment_and_a_shorter_one_is_refused(small, tmp_path: Path) -> None:
    from xtra.model.artifact import read_model_artifact

    tmp, prepared = small
    _ok(run_pretrain(tmp_path, tiny_params(tmp, prepared, epochs=1, max_steps=4), prepared))
    first = read_model_artifact(tmp_path / "models" / "m" / "model.pt").provenance
    assert first["steps"] == 4 and [s["total_steps"] for s in first["segments"]] == [4]
    stdout = _ok(run_pretrain(tmp_path, tiny_params(tmp, prepared, epochs=1, max_steps=6), prepared))
    assert "resuming from" in stdout and "step-000004.ckpt" in stdout
    second = read_model_artifact(tmp_path / "models" / "m" / "model.pt").provenance
    assert second["steps"] == 6 and second["run_id"] == first["run_id"]
    assert second["segments"] == [
        {"start_step": 0, "end_step": 4, "epochs": 1, "max_steps": 4, "total_steps": 4},
        {"start_step": 4, "end_step": 6, "epochs": 1, "max_steps": 6, "total_steps": 6},
    ]
    assert second["identity"] != first["identity"]  # an extended run is another model than one of 6 from the start
    shorter = run_pretrain(tmp_path, tiny_params(tmp, prepared, epochs=1, max_steps=5), prepared)
    assert shorter.returncode == 2, shorter.stdout[-2000:] + shorter.stderr[-2000:]
    assert "models.m.train.epochs (1) / max_steps (5) ask for 5 steps" in shorter.stderr
    assert "has taken 6" in shorter.stderr and "--restart" in shorter.stderr
    assert read_model_artifact(tmp_path / "models" / "m" / "model.pt").provenance == second  # the model is kept


def test_a_new_recipe_version_is_a_new_run_and_a_new_probe_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pretrain version is part of the run id; the probe version part of a job's identity."""
    from xtra import identity as table
    from xtra.identity import key_values, stage_identity, stage_keys
    from xtra.train.identity import run_id, trajectory

    params = validate_params(_params_with(small_model()), check_paths=False)
    run = run_id(trajectory(params, "m", 1, "data"))
    keys = key_values(params, stage_keys(params, "probe", model="m", benchmark="mnist", kinds=["linear"]))
    job = stage_identity("probe", keys, {"model": "x"})
    versions = table.recipe_versions()
    monkeypatch.setattr(table, "recipe_versions", lambda: {**versions, "pretrain": versions["pretrain"] + 1})
    assert run_id(trajectory(params, "m", 1, "data")) != run
    assert stage_identity("probe", keys, {"model": "x"}) == job
    monkeypatch.setattr(table, "recipe_versions", lambda: {**versions, "probe": versions["probe"] + 1})
    assert stage_identity("probe", keys, {"model": "x"}) != job


def test_trajectory_keys_exclude_what_does_not_change_the_optimisation() -> None:
    from xtra.train.identity import changed_keys, run_id, trajectory

    params = validate_params(_params_with(small_model()), check_paths=False)
    base = trajectory(params, "m", 2, "data")
    train = params["models"]["m"]["train"]
    for key, value in (
        ("log_every_n_steps", 3),
        ("checkpoint_every_n_steps", 9),
        ("reconstruct_images", 0),
        ("epochs", 40),
        ("max_steps", 10),
        ("val_every_n_steps", 5),
    ):
        edited = dict(params, models={"m": {**params["models"]["m"], "train": {**train, key: value}}})
        assert run_id(trajectory(edited, "m", 2, "data")) == run_id(base), key
    arch = {**params["models"]["m"]["arch"], "attn_impl": "reference"}
    assert run_id(
        trajectory(dict(params, models={"m": {**params["models"]["m"], "arch": arch}}), "m", 2, "data")
    ) == run_id(base)
    lr = dict(params, models={"m": {**params["models"]["m"], "train": {**train, "lr": 0.5}}})
    assert changed_keys(base, trajectory(lr, "m", 2, "data")) == ["train.lr: 0.001 -> 0.5"]
    assert run_id(trajectory(params, "m", 4, "data")) != run_id(base)  # the world size is part of the run
    for loader in ("stream", "random"):  # neither loader's order depends on its workers (xtra.data.streaming)
        section = {**train, "loader": loader}
        one = trajectory(dict(params, models={"m": {**params["models"]["m"], "train": section}}), "m", 2, "data")
        seven = trajectory(
            dict(params, models={"m": {**params["models"]["m"], "train": {**section, "num_workers": 7}}}),
            "m",
            2,
            "data",
        )
        assert run_id(seven) == run_id(one), loader
    rand = trajectory(
        dict(params, models={"m": {**params["models"]["m"], "train": {**train, "loader": "random"}}}), "m", 2, "data"
    )
    assert run_id(rand) != run_id(base)


def _lr_rows(directory: Path) -> list[float]:
    return [float(r["lr"]) for r in _log(directory / "models" / "m" / "log.csv")]


@pytest.mark.parametrize("devices, batch", [(1, 8), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_schedule_runs_from_warmup_start_to_lr_to_min_lr(small, tmp_path: Path, devices: int, batch: int) -> None:
    """accumulate 2 over 3 batches an epoch: 2 steps an epoch (the last of one batch), not 1."""
    from xtra.train.schedule import release_warmup_cosine

    tmp, prepared = small
    params = tiny_params(
        tmp,
        prepared,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        epochs=4,
        batch_size=batch,
        accumulate_grad_batches=2,
        warmup_epochs=1,
        lr=1e-3,
        warmup_start_lr=1e-4,
        min_lr=1e-5,
    )
    _ok(run_pretrain(tmp_path, params, prepared, timeout=300))
    plan = json.loads((tmp_path / "models" / "m" / "run.json").read_text())
    assert plan["world_size"] == devices and plan["global_batch"] == 16
    assert plan["batches_per_epoch"] == 3 and plan["steps_per_epoch"] == 2
    total, warmup = 8, 2
    lrs = _lr_rows(tmp_path)
    assert len(lrs) == total  # accumulation never cuts an epoch short
    assert lrs[0] == pytest.approx(1e-4) and lrs[warmup - 1] == pytest.approx(1e-3)
    assert lrs == pytest.approx([release_warmup_cosine(s, 1e-3, total, warmup, 1e-4, 1e-5) for s in range(total)])
    metrics = json.loads((tmp_path / "models" / "m" / "metrics.json").read_text())
    assert metrics["final_lr"] == pytest.approx(1e-5) and metrics["steps"] == total


def test_two_ranks_draw_different_drop_path_masks() -> None:
    from xtra.train.config import TrainConfig
    from xtra.train.module import PretrainModule, model_seed

    arch = {**TINY_ARCH, "drop_path_rate": 0.5}
    train = validate_params(_params_with(small_model()), check_paths=False)["models"]["m"]["train"]
    module = PretrainModule(arch, TrainConfig.from_dict(train), steps_per_epoch=10, run_id="r", seed=0)
    module.model.train()
    x = torch.randn(8, 3, 16, 16)

    def encoded(rank: int) -> torch.Tensor:
        torch.manual_seed(model_seed(0, rank, step=3, micro=0))  # what training_step seeds on rank `rank`
        return module.model.encoder(x)

    assert torch.equal(encoded(0), encoded(0))  # a pure function of (seed, rank, step)
    assert not torch.equal(encoded(0), encoded(1))


def test_devices_must_be_a_positive_integer_or_auto() -> None:
    for bad in (-1, 0, "all"):
        params = _params_with(small_model(devices=bad))
        with pytest.raises(ParamsError, match="devices"):
            validate_params(params, check_paths=False)
    validate_params(_params_with(small_model(devices="auto")), check_paths=False)
    with pytest.raises(ParamsError, match="strategy"):
        validate_params(_params_with(small_model(strategy="fsdp")), check_paths=False)


def test_random_control_writes_a_weights_only_model(tmp_path: Path) -> None:
    from xtra.model.artifact import read_model_artifact

    params = _params_with({"init": "random", "arch": small_model()["arch"]})
    path = write_params(tmp_path, params)
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    out = tmp_path / "models" / "m"
    metrics = json.loads((out / "metrics.json").read_text())
    ident = metrics.pop("identity")
    assert metrics == {"init": "random", "steps": 0, "images_seen": 0, "seed": 0}
    artifact = read_model_artifact(out / "model.pt")
    assert artifact.init == "random" and any(k.startswith("encoder.") for k in artifact.state_dict)
    assert artifact.provenance["identity"] == ident
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "model.pt", out / "metrics.json")}
    again = run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)  # the same identity: left untouched
    assert "up to date" in again.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    (out / "model.pt").unlink()  # what DVC does before a forced re-run: the same bytes come back
    run_xtra("pretrain", "m", "--params", str(path), cwd=tmp_path)
    assert (out / "model.pt").read_bytes() == before[out / "model.pt"][0]


def test_truncated_resume_checkpoint_falls_back_to_the_previous_one_and_nothing_is_deleted(tmp_path: Path) -> None:
    from xtra.train.checkpoints import find_resume_checkpoint

    run_dir = tmp_path / "checkpoints" / "r"
    run_dir.mkdir(parents=True)
    torch.save({"hyper_parameters": {"run_id": "r"}, "global_step": 10}, run_dir / "step-000010.ckpt")
    (run_dir / "step-000020.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert find_resume_checkpoint(run_dir, "r") == run_dir / "step-000010.ckpt"
    assert (run_dir / "step-000020.ckpt").exists()
    with pytest.raises(CheckpointError, match="belongs to run 'r'"):
        find_resume_checkpoint(run_dir, "other")
    assert find_resume_checkpoint(tmp_path / "none", "r") is None


def test_keep_last_checkpoints_and_every_nth(tmp_path: Path) -> None:
    from xtra.train.checkpoints import prune_checkpoints

    for step in range(1, 11):
        (tmp_path / f"step-{step:06d}.ckpt").write_bytes(b"x")
    prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert sorted(int(p.stem[5:]) for p in tmp_path.glob("step-*.ckpt")) == [4, 8, 9, 10]


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    params = _params_with({"init": "random", "arch": small_model()["arch"]})
    path = write_params(tmp_path, params)
    proc = run_xtra("pretrain", "nope", "--params", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "models.nope: no such model" in proc.stderr


@pytest.mark.faults
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    import yaml

    from xtra.model import xtra as xtra_module
    from xtra.train.module import NonFiniteLossError
    from xtra.train.pretrain import pretrain_model

    original = xtra_module.XTRA.loss

    def poisoned(self, images, step=0):
        loss = original(self, images, step)
        return loss * float("nan") if step is not None and step >= 5 else loss

    monkeypatch.setattr(xtra_module.XTRA, "loss", poisoned)
    tmp, prepared = small
    path = write_params(tmp_path, tiny_params(tmp, prepared, max_steps=8), prepared)
    params = validate_params(yaml.safe_load(path.read_text()))
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        pretrain_model(params, "m")
    out = tmp_path / "models" / "m"
    run_dir = Path(json.loads((out / "run.json").read_text())["run_dir"])
    assert torch.load(run_dir / "step-000004.ckpt", weights_only=False)["global_step"] == 4
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


def _paper_model_run(tmp_path: Path, preset: str, img_size: int) -> None:
    """The paper architecture through `xtra pretrain` on fixture images in the ImageNet layout: 1 step,
    then extended to 2 (a resume), the weights-only model.pt, and a probe job's loading of it."""
    from tests.fixtures.raw import make_imagenet1k
    from xtra.data.prepare import prepare_dataset
    from xtra.model.arch import MODEL_PRESETS
    from xtra.model.artifact import read_model_artifact
    from xtra.model.checkpoint import load_artifact_encoder

    info = make_imagenet1k(tmp_path / "raw")
    params = demo_params()
    params["datasets"] = {"imagenet1k": {**info.params, "image_size": img_size}}
    train = {
        "epochs": 1,
        "batch_size": 2,
        "accelerator": "cpu",
        "num_workers": 0,
        "warmup_epochs": 0,
        "checkpoint_every_n_steps": 1,
        "keep_last_checkpoints": 1,
        "log_every_n_steps": 1,
        "reconstruct_images": 0,
        "precision": "32-true",
        "max_steps": 1,
    }
    params["models"] = {
        "m": {
            "init": "pretrain",
            "dataset": "imagenet1k",
            "eval_resize": img_size,
            "arch": {**MODEL_PRESETS[preset], "attn_impl": "sdpa"},
            "train": train,
        }
    }
    params["probe"]["benchmarks"] = {"in1k": {"dataset": "imagenet1k", "eval_split": "val", "kinds": ["linear"]}}
    prepared = tmp_path / "prepared"
    prepare_dataset("imagenet1k", validate_params(params, check_paths=False)["datasets"]["imagenet1k"], prepared)
    first = _ok(run_pretrain(tmp_path, params, prepared, timeout=1800))
    assert "total 1 steps" in first
    params["models"]["m"]["train"]["max_steps"] = 2  # extending max_steps continues the same run
    second = _ok(run_pretrain(tmp_path, params, prepared, timeout=1800))
    assert "resuming from" in second and "step-000001.ckpt" in second
    artifact = read_model_artifact(tmp_path / "models" / "m" / "model.pt")
    assert artifact.provenance["steps"] == 2
    # the probe job's own loader (weights-only, mmap), with the params' arch as the expected one
    encoder, _, init = load_artifact_encoder(tmp_path / "models" / "m" / "model.pt", params["models"]["m"]["arch"])
    assert init == "pretrain"
    with torch.no_grad():
        tokens = encoder.eval()(torch.zeros(1, 3, img_size, img_size))
    assert tokens.shape == (1, (img_size // artifact.arch["patch_size"]) ** 2, encoder.width)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_paper_b16_architecture_trains_resumes_and_its_model_file_loads(tmp_path: Path) -> None:
    _paper_model_run(tmp_path, "xtra_b16", 256)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_paper_h14_architecture_trains_resumes_and_its_model_file_loads(tmp_path: Path) -> None:
    _paper_model_run(tmp_path, "xtra_h14", 224)


def test_restart_moves_the_run_aside_and_never_deletes_it(tmp_path: Path) -> None:
    from xtra.train.pretrain import _run_dir

    old = tmp_path / "checkpoints" / "abc"
    old.mkdir(parents=True)
    (old / "step-000010.ckpt").write_bytes(b"weights")
    assert _run_dir(tmp_path, "abc", restart=False, is_zero=True) == old and (old / "step-000010.ckpt").exists()
    fresh = _run_dir(tmp_path, "abc", restart=True, is_zero=True)
    assert fresh == old and not list(fresh.iterdir())
    (aside,) = (tmp_path / "checkpoints").glob("abc.restarted-*")
    assert (aside / "step-000010.ckpt").read_bytes() == b"weights"
