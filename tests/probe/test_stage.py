"""The probe stage end to end on a tiny encoder and two tiny prepared datasets: result JSONs, the
held-out protocol, Ray with retries and a failing job, and bad input refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtra.atomic import sha256_file
from xtra.config import validate_params
from xtra.data.prepare import prepare_dataset
from xtra.data.readers.common import stratified_indices
from xtra.data.source import RawDataset, Sample
from xtra.errors import CheckpointError, DataError, ParamsError
from xtra.model.arch import ArchConfig
from xtra.model.artifact import save_model_artifact
from xtra.model.xtra import XTRA
from xtra.probe.cli import configure_parser, probe_model, run
from xtra.probe.driver import ATTEMPT_LOG_ENV, FAIL_ENV, init_ray
from xtra.probe.job import ProbeJob, plan_jobs, preflight

ARCH = {
    "preset": "tiny",
    "width": 32,
    "depth": 2,
    "num_heads": 2,
    "img_size": 16,
    "patch_size": 4,
    "block_size": 2,
    "predictor_depth": 1,
    "predictor_width": 16,
    "predictor_num_heads": 1,
}
CLASSES = ["a", "b", "c", "d", "e"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _reader(train: int, test: int, seed: int):
    """A reader of in-memory 16x16 RGB images whose brightness and colour depend on the class."""

    def read(_params: dict) -> RawDataset:
        rng = np.random.default_rng(seed)
        splits = {}
        for split, count in (("train", train), ("test", test)):
            samples = []
            for i in range(count):
                label = i % len(CLASSES)
                image = rng.integers(0, 60, size=(16, 16, 3)) + 40 * label
                image[..., label % 3] += 20
                samples.append(Sample(key=f"{split}_{i:04d}", image=image.clip(0, 255).astype(np.uint8), label=label))
            splits[split] = samples
        return RawDataset(classes=list(CLASSES), splits=splits, source=f"test reader {seed}")

    return read


def make_params(tmp: Path, lrs=(1e-3, 1e-2), epochs: int = 2, protocol: str = "paper") -> dict:
    """A validated params dict: two datasets, one random-init model, two benchmarks x two kinds."""
    (tmp / "raw" / "test").mkdir(parents=True, exist_ok=True)  # kind `custom` has a `test` split where it is
    params = {
        "profile": "test",
        "seed": 0,
        "paths": {"prepared": str(tmp / "prepared"), "models": str(tmp / "models"), "results": str(tmp / "results")},
        "datasets": {
            name: {"kind": "custom", "root": str(tmp / "raw"), "image_size": 16, "size_check": "warn", "num_workers": 0}
            for name in ("set_a", "set_b")
        },
        "models": {"rand": {"init": "random", "eval_resize": 16, "arch": dict(ARCH)}},
        "probe": {
            "benchmarks": {
                "bench_a": {
                    "dataset": "set_a",
                    "eval_split": "test",
                    "epochs": epochs,
                    "batch_size": 16,
                    "lrs": list(lrs),
                },
                "bench_b": {
                    "dataset": "set_b",
                    "eval_split": "test",
                    "epochs": epochs,
                    "batch_size": 16,
                    "lrs": list(lrs),
                    "kinds": ["linear", "attentive"],
                },
            },
            "protocol": protocol,
            "kinds": {"attentive": {"num_last_blocks": 2, "num_heads": 4}},
            "augment": False,
            "num_workers": 0,
            "ray": {"max_retries": 1, "cpus_per_job": 1},
        },
    }
    return validate_params(params, "test params", check_paths=False)


def build_inputs(params: dict, datasets=("set_a", "set_b")) -> None:
    """Prepare the datasets and write the random-init model's checkpoint and metrics."""
    for i, name in enumerate(datasets):
        prepare_dataset(name, params["datasets"][name], Path(params["paths"]["prepared"]), reader=_reader(40, 20, i))
    torch.manual_seed(0)
    out = Path(params["paths"]["models"]) / "rand"
    save_model_artifact(
        out / "model.pt", init="random", arch=ARCH, state_dict=XTRA(ArchConfig.from_dict(ARCH)).state_dict()
    )
    (out / "metrics.json").write_text(json.dumps({"images_seen": 1234}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("probe_stage")
    params = make_params(tmp)
    build_inputs(params)
    return params


def _check_result(params: dict, bench: str, kind: str) -> dict:
    path = Path(params["paths"]["results"]) / "probe" / "rand" / f"{bench}-{kind}.json"
    data = json.loads(path.read_text())
    assert (data["model"], data["benchmark"], data["kind"]) == ("rand", bench, kind)
    assert data["protocol"] == params["probe"]["protocol"]
    lrs = params["probe"]["benchmarks"][bench]["lrs"]
    assert [h["lr"] for h in data["heads"]] == lrs
    for head in data["heads"]:
        assert 0.0 <= head["top1"] <= head["top5"] <= 100.0
    best = max(data["heads"], key=lambda h: h["top1"]) if data["protocol"] == "paper" else None
    if best is not None:
        assert data["top1"] == best["top1"] and data["selected"]["lr"] == best["lr"]
    ckpt = Path(params["paths"]["models"]) / "rand" / "model.pt"
    assert data["checkpoint_sha256"] == sha256_file(ckpt)
    manifest = Path(params["paths"]["prepared"]) / params["probe"]["benchmarks"][bench]["dataset"] / "manifest.json"
    assert data["manifest_sha256"] == sha256_file(manifest)
    assert data["images_seen_pretrain"] == 1234 and data["features"] == "cached"
    assert data["epochs"] == params["probe"]["benchmarks"][bench]["epochs"] and data["seed"] == 0
    assert data["num_eval"] == 20 and "wall_time_s" not in data  # no timing in a result: a re-run's bytes
    assert data["identity"] and data["model_identity"]
    return data


@pytest.mark.timeout(120)
def test_in_process_job_writes_a_valid_result(workspace):
    assert probe_model(workspace, "rand", ["bench_a"], ["attentive"], use_ray=False) == 0
    data = _check_result(workspace, "bench_a", "attentive")
    assert data["num_train"] == 40 and data["heldout"] is None


@pytest.mark.timeout(120)
def test_a_finished_job_rewrites_the_same_results_without_evaluating(workspace, monkeypatch, capsys):
    """DVC deletes a stage's outputs before re-running it: the finished job's state keeps its results, so
    the JSONs come back byte for byte, with nothing trained or evaluated (the loop's functions would fail)."""
    from xtra.probe import job as job_module

    assert probe_model(workspace, "rand", ["bench_b"], None, use_ray=False) == 0
    folder = Path(workspace["paths"]["results"]) / "probe" / "rand"
    before = {p.name: p.read_bytes() for p in folder.glob("bench_b-*.json")}
    assert sorted(before) == ["bench_b-attentive.json", "bench_b-linear.json"]
    for path in folder.glob("bench_b-*.json"):
        path.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished job trained or evaluated again")

    monkeypatch.setattr(job_module, "train_banks", no_training)
    monkeypatch.setattr(job_module, "evaluate_bank", no_training)
    capsys.readouterr()
    assert probe_model(workspace, "rand", ["bench_b"], None, use_ray=False) == 0
    assert "finished before" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in folder.glob("bench_b-*.json")} == before


@pytest.mark.timeout(120)
def test_a_result_of_another_job_never_passes_for_a_finished_one(workspace, tmp_path):
    """The skip check compares identities: a job killed during its evaluation (state: every epoch trained,
    no results) leaves the results of the job before it on disk; with other params they are not this
    job's, and the job runs (the old check trusted the state and skipped it)."""
    import copy

    from xtra.probe.config import probe_config
    from xtra.probe.driver import is_finished
    from xtra.probe.job import job_identity
    from xtra.probe.state import save_state, state_path

    params = copy.deepcopy(workspace)
    params["paths"]["results"] = str(tmp_path / "results")
    job = ProbeJob("rand", "bench_a", ("linear",))
    assert probe_model(params, "rand", ["bench_a"], ["linear"], use_ray=False) == 0
    assert is_finished(params, job)
    params["probe"]["benchmarks"]["bench_a"]["lrs"] = [1e-3, 3e-2]  # another job, killed during evaluation:
    cfg = probe_config(params, "rand", "bench_a", ("linear",))
    save_state(state_path(cfg), job_identity(params, job)[0], cfg.sweeps[0].epochs, {})
    assert not is_finished(params, job)


@pytest.mark.timeout(120)
def test_heldout_protocol_selects_on_the_heldout_part(tmp_path):
    params = make_params(tmp_path, lrs=(1e-4, 1e-2, 1e-1), protocol="heldout")
    build_inputs(params, datasets=("set_a",))
    assert probe_model(params, "rand", ["bench_a"], ["linear"], use_ray=False) == 0
    data = _check_result(params, "bench_a", "linear")
    held = data["heldout"]
    assert data["num_train"] == 36 and held["num_heldout"] == 4  # 10 % of 40, stratified over 5 classes
    best = max(data["heads"], key=lambda h: h["heldout_top1"])
    assert held["selected"]["lr"] == best["lr"] and data["top1"] == best["top1"] == held["top1"]


@pytest.mark.timeout(120)
def test_augmented_bf16_run_recomputes_features(workspace, tmp_path):
    params = json.loads(json.dumps(workspace))
    params["paths"]["results"] = str(tmp_path / "results")
    params["probe"].update(augment=True, precision="bf16-mixed")
    params["probe"]["benchmarks"]["bench_a"].update(accum_steps=2, warmup_epochs=1)
    assert probe_model(params, "rand", ["bench_a"], ["attentive"], use_ray=False) == 0
    data = json.loads((tmp_path / "results" / "probe" / "rand" / "bench_a-attentive.json").read_text())
    assert data["features"] == "recomputed" and data["augment"] is True and data["precision"] == "bf16-mixed"
    assert data["accum_steps"] == 2 and all(0 <= h["top1"] <= 100 for h in data["heads"])


def test_stratified_split_keeps_every_class():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    kept, held = stratified_indices(labels, 0.2, seed=3)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert len(held) == round(0.2 * len(labels)) == 4
    assert np.bincount(labels[held], minlength=4).tolist()[:2] == [2, 1]  # exact quotas; 1 more by remainder
    assert np.bincount(labels[kept], minlength=4).min() >= 1


@pytest.fixture(scope="module")
def ray_session():
    import ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_runs_four_jobs_and_reports_a_failing_one(workspace, ray_session, tmp_path, monkeypatch):
    assert probe_model(workspace, "rand") == 0
    for bench in ("bench_a", "bench_b"):
        for kind in ("linear", "attentive"):
            _check_result(workspace, bench, kind)
    failures = Path(workspace["paths"]["results"]) / "probe" / "rand" / "failures.json"
    assert not failures.exists()

    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(FAIL_ENV, "bench_b")
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    stale = Path(workspace["paths"]["results"]) / "probe" / "rand" / "bench_a-linear.json"
    stale.unlink()
    (stale.parent / "bench_b-linear.json").unlink()  # both jobs unfinished again (a finished job is skipped)
    assert probe_model(workspace, "rand") == 1
    lines = attempts.read_text().splitlines()
    assert lines.count("rand/bench_b") == 2  # max_retries 1: the first attempt and one retry
    assert lines.count("rand/bench_a") == 1  # one result was missing: the job ran again (from its state)
    _check_result(workspace, "bench_a", "linear")  # the other jobs completed
    report = json.loads(failures.read_text())["failures"]
    assert [(f["job"], f["attempts"]) for f in report] == [("bench_b-linear", 2), ("bench_b-attentive", 2)]
    assert "InjectedFailure" in report[0]["error"]
    assert (
        not (stale.parent / "bench_b-linear.json").exists() and not (stale.parent / "bench_b-attentive.json").exists()
    )

    monkeypatch.delenv(FAIL_ENV)
    assert probe_model(workspace, "rand", ["bench_b"], use_ray=False) == 0
    assert not failures.exists()  # the job succeeded again: its failure entry is gone


def test_in_process_failure_is_retried_and_reported(workspace, tmp_path, monkeypatch, capsys):
    params = json.loads(json.dumps(workspace))
    params["paths"]["results"] = str(tmp_path / "results")
    params["probe"]["ray"]["max_retries"] = 2
    monkeypatch.setenv(FAIL_ENV, "*")
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(tmp_path / "attempts.log"))
    assert probe_model(params, "rand", ["bench_a"], ["linear"], use_ray=False) == 1
    assert (tmp_path / "attempts.log").read_text().splitlines() == ["rand/bench_a"] * 3
    report = json.loads((tmp_path / "results" / "probe" / "rand" / "failures.json").read_text())
    assert report["failures"][0]["job"] == "bench_a-linear" and report["failures"][0]["attempts"] == 3
    assert "failed after 3 attempt(s)" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_runs_one_job_in_process(workspace, tmp_path, monkeypatch, capsys):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(workspace))
    parser = __import__("argparse").ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["rand", "--params", str(path), "--benchmark", "bench_b", "--kind", "linear", "--no-ray"])
    assert run(args) == 0
    assert "bench_b-linear.json" in capsys.readouterr().out


# ---- bad input: refused before any training starts -------------------------------------------------


def test_cli_reports_bad_input_without_traceback(workspace, tmp_path, capsys):
    import yaml

    from xtra.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(workspace))
    assert main(["probe", "rand", "--params", str(path), "--benchmark", "nope", "--no-ray"]) == 2
    assert "error: " in capsys.readouterr().err
    # an unknown kind is refused by the registry, naming the known ones
    assert main(["probe", "rand", "--params", str(path), "--kind", "knn", "--no-ray"]) == 2
    assert "unknown probe kind ['knn']; expected some of ['attentive', 'linear']" in capsys.readouterr().err


def test_unknown_benchmark_or_kind_is_refused(workspace):
    with pytest.raises(ParamsError, match="no benchmark.*nope"):
        plan_jobs(workspace, "rand", ["nope"])
    with pytest.raises(ParamsError, match="unknown probe kind"):
        plan_jobs(workspace, "rand", None, ["knn"])
    with pytest.raises(ParamsError, match="models.ghost"):
        plan_jobs(workspace, "ghost")
    assert plan_jobs(workspace, "rand", ["bench_b"], ["attentive"]) == [ProbeJob("rand", "bench_b", ("attentive",))]
    assert [j.kinds for j in plan_jobs(workspace, "rand")] == [("linear", "attentive")] * 2  # one job per benchmark
    params = json.loads(json.dumps(workspace))
    params["probe"]["benchmarks"]["bench_a"]["kinds"] = ["linear"]
    with pytest.raises(ParamsError, match=r"bench_a.kinds.*attentive"):
        plan_jobs(params, "rand", ["bench_a"], ["attentive"])
    assert [j.result_names() for j in plan_jobs(params, "rand", None, ["attentive"])] == [["bench_b-attentive"]]


def test_wrong_architecture_is_refused(workspace):
    params = json.loads(json.dumps(workspace))
    params["models"]["rand"]["arch"]["block_size"] = 1
    with pytest.raises(CheckpointError, match="block_size"):
        probe_model(params, "rand", use_ray=False)


def test_unprepared_dataset_is_refused(workspace, tmp_path):
    params = json.loads(json.dumps(workspace))
    params["paths"]["prepared"] = str(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"bench_a.*set_a.*never prepared.*manifest.json"):
        probe_model(params, "rand", ["bench_a"], use_ray=False)


def test_missing_split_and_empty_grid_are_refused(workspace):
    params = json.loads(json.dumps(workspace))
    params["probe"]["benchmarks"]["bench_a"]["eval_split"] = "val"
    with pytest.raises(DataError, match="bench_a.eval_split.*no split 'val'"):
        preflight(params, "rand", [ProbeJob("rand", "bench_a", ("linear",))])
    params = json.loads(json.dumps(workspace))
    params["probe"]["benchmarks"]["bench_a"]["lrs"] = []
    with pytest.raises(ParamsError, match="bench_a.lrs: empty sweep grid"):
        preflight(params, "rand", [ProbeJob("rand", "bench_a", ("linear",))])


def test_attentive_shape_errors_are_refused(workspace):
    params = json.loads(json.dumps(workspace))
    attentive = params["probe"]["kinds"]["attentive"]
    attentive["num_last_blocks"] = 3
    with pytest.raises(ParamsError, match="probe.kinds.attentive.num_last_blocks"):
        preflight(params, "rand", [ProbeJob("rand", "bench_a", ("attentive",))])
    attentive["num_last_blocks"], attentive["num_heads"] = 2, 5
    with pytest.raises(ParamsError, match="probe.kinds.attentive.num_heads"):
        preflight(params, "rand", [ProbeJob("rand", "bench_a", ("attentive",))])
