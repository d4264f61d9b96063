"""Probe jobs at paper scale, shown at toy scale: one job for both kinds equals two, augmentation is
reproducible, a killed job resumes to the same end, 2 processes equal 1, the release's schedule and
accumulation rule, the shared normalisation, the pixel floor."""

from __future__ import annotations

import builtins
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import REPO
from tests.probe.test_stage import build_inputs, make_params
from xtra.config import load_params
from xtra.errors import ParamsError
from xtra.model.probe_kinds.attentive import AttentiveProbe
from xtra.model.probe_kinds.linear import LinearProbe
from xtra.model.probes import FeatureNorm, HeadBank
from xtra.probe.cli import probe_model
from xtra.probe.config import probe_config
from xtra.probe.job import plan_jobs
from xtra.probe.loop import BankTrainer, CachedFeatures
from xtra.probe.state import state_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(tmp: Path, results: str, **probe) -> dict:
    params = make_params(tmp, lrs=(1e-3, 3e-2), epochs=3)
    params["paths"]["results"] = str(tmp / results)
    params["probe"].update(probe)
    return params


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("probe_jobs")
    build_inputs(make_params(tmp), datasets=("set_b",))
    return tmp


def _run(tmp: Path, results: str, kinds=None, **probe) -> dict:
    params = _params(tmp, results, **probe)
    assert probe_model(params, "rand", ["bench_b"], kinds, use_ray=False) == 0
    return params


def _outcome(params: dict, kinds: tuple[str, ...]) -> tuple[dict, dict]:
    """(the final bank tensors per kind, the result JSON per kind) of bench_b."""
    cfg = probe_config(params, "rand", "bench_b", kinds)
    state = torch.load(state_path(cfg), weights_only=True)
    banks = {k: state["trainers"][k]["bank"] for k in kinds}
    res = Path(params["paths"]["results"]) / "probe" / "rand"
    results = {k: json.loads((res / f"bench_b-{k}.json").read_text()) for k in kinds}
    return banks, results


def _same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


BOTH = ("linear", "attentive")


@pytest.mark.timeout(300)
def test_one_job_for_both_kinds_equals_separate_jobs_and_repeats_with_augmentation(inputs):
    both = _run(inputs, "both", augment=True)
    banks, results = _outcome(both, BOTH)
    again = _run(inputs, "again", augment=True)
    banks2, results2 = _outcome(again, BOTH)
    for kind in BOTH:  # reproducible with augmentation on: bit for bit
        _same(banks[kind], banks2[kind], atol=0)
        assert [h["top1"] for h in results[kind]["heads"]] == [h["top1"] for h in results2[kind]["heads"]]
    for kind in BOTH:
        alone = _run(inputs, f"alone_{kind}", kinds=[kind], augment=True)
        single, single_results = _outcome(alone, (kind,))
        _same(banks[kind], single[kind], atol=1e-6)
        assert [h["top1"] for h in results[kind]["heads"]] == [h["top1"] for h in single_results[kind]["heads"]]
        assert results[kind]["features"] == "recomputed"


def _cli(params_file: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "xtra.cli",
            "probe",
            "rand",
            "--params",
            str(params_file),
            "--benchmark",
            "bench_b",
            "--no-ray",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # two CLI runs in subprocesses: about 45 s on 2 cores
@pytest.mark.timeout(400)
def test_a_sigkilled_job_resumes_to_the_result_of_an_uninterrupted_one(inputs):
    whole = _run(inputs, "whole", augment=True)
    params = _params(inputs, "killed", augment=True)
    params_file = inputs / "killed.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XTRA_PROBE_KILL_AFTER_EPOCH": "1"}
    killed = _cli(params_file, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cfg = probe_config(params, "rand", "bench_b")
    assert torch.load(state_path(cfg), weights_only=True)["epochs_done"] == 1
    env.pop("XTRA_PROBE_KILL_AFTER_EPOCH")
    resumed = _cli(params_file, env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    log = state_path(cfg).with_suffix(".log").read_text().splitlines()
    assert log[:2] == ["start epoch 0", "resume epoch 1"] and log[2].startswith("finished in ")
    banks, results = _outcome(params, BOTH)
    banks_whole, results_whole = _outcome(whole, BOTH)
    for kind in BOTH:
        _same(banks[kind], banks_whole[kind], atol=0)
        assert results[kind]["top1"] == results_whole[kind]["top1"]
    again = _cli(params_file, env)  # finished: skipped
    assert again.returncode == 0 and "finished job(s) skipped" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_equal_one(inputs, monkeypatch):
    one = _run(inputs, "one", augment=True)
    params = _params(inputs, "two", augment=True)
    params["probe"]["benchmarks"]["bench_b"]["devices"] = 2
    # as Ray leaves it in a process that ran a Ray job: the job's log function must still pickle
    monkeypatch.setattr(builtins, "print", functools.partial(builtins.print))
    assert probe_model(params, "rand", ["bench_b"], use_ray=False) == 0
    banks1, results1 = _outcome(one, BOTH)
    banks2, results2 = _outcome(params, BOTH)
    for kind in BOTH:
        _same(banks1[kind], banks2[kind], atol=1e-5)
        assert [h["top1"] for h in results1[kind]["heads"]] == [h["top1"] for h in results2[kind]["heads"]]


def test_shared_norm_is_batchnorm_exactly():
    torch.manual_seed(0)
    for shape in ((32, 8), (6, 5, 8)):
        ours, ref = FeatureNorm(8), nn.BatchNorm1d(8, affine=False, eps=1e-6)
        for _ in range(3):
            x = torch.randn(*shape) * 3 + 1
            flat = x.reshape(-1, 8)
            torch.testing.assert_close(ours(x).reshape(-1, 8), ref(flat), rtol=0, atol=0)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x).reshape(-1, 8), ref(flat), rtol=0, atol=0)


def test_a_bank_with_one_norm_equals_heads_with_their_own():
    torch.manual_seed(0)
    pooled = torch.randn(10, 4, 16)
    bank = HeadBank("attentive", 16, 3, [(1e-3, 0.0), (1e-2, 0.0)], {"num_heads": 4}, seed=2)
    torch.manual_seed(2)
    own = AttentiveProbe(16, 3, 4)  # a standalone head with its own BatchNorm, the same seed
    logits = bank(pooled)
    torch.testing.assert_close(logits[1], own(pooled), rtol=0, atol=0)
    assert not any("bn" in k for k in bank.heads.state_dict())  # no per-head normalisation left


def test_heads_start_from_the_release_init():
    torch.manual_seed(0)
    head = LinearProbe(400, 1000, norm=False)
    bound = 1 / math.sqrt(400)  # nn.Linear's default: kaiming-uniform(a=sqrt 5) weights, uniform bias
    assert head.linear.weight.abs().max() <= bound and head.linear.weight.abs().max() > 0.95 * bound
    assert head.linear.bias.abs().max() > 0.9 * bound  # not zero
    attn = AttentiveProbe(512, 10, 8, norm=False)
    assert abs(attn.query.std().item() - 0.02) < 0.003 and attn.query.abs().max() > 0.04  # normal, not truncated


def _bolts_rates(base: float, start: float, eta_min: float, warmup: int, total: int) -> list[float]:
    """lightning-bolts' LinearWarmupCosineAnnealingLR.get_lr, stepped as a chainable scheduler: the rule
    as the release ran it, rate by rate from the previous one (written from the scheduler's definition)."""
    rates, lr = [], start
    for t in range(total):
        if t == 0:
            lr = start
        elif t < warmup:
            lr = lr + (base - start) / (warmup - 1)
        elif t == warmup:
            lr = base
        else:
            span = total - warmup
            lr = (1 + math.cos(math.pi * (t - warmup) / span)) / (1 + math.cos(math.pi * (t - warmup - 1) / span)) * (
                lr - eta_min
            ) + eta_min
        rates.append(lr)
    return rates


@pytest.mark.parametrize("benchmark,num_train", [("cifar10", 50_000), ("in1k", 1_281_167)])
def test_release_schedule_of_the_h14_profile(benchmark, num_train):
    params = load_params(REPO / "profiles" / "paper_h14.yaml", check_paths=False)
    cfg = probe_config(params, "xtra_h14", benchmark)
    bench = params["probe"]["benchmarks"][benchmark]
    batches = num_train // bench["batch_size"]  # drop_last
    for sweep in cfg.sweeps:
        trainer = BankTrainer(
            HeadBank(sweep.kind, 32, 2, sweep.settings[:2], {"num_heads": 4}), sweep, batches, torch.device("cpu")
        )
        for lr in (sweep.settings[0][0], sweep.settings[1][0]):
            steps_per_epoch = math.ceil(batches / bench["accum_steps"])
            expected = _bolts_rates(
                lr, lr * 0.1, 1e-5, bench["warmup_epochs"] * steps_per_epoch, steps_per_epoch * bench["epochs"]
            )
            got = [trainer.lrs(t)[2 * sweep.settings.index((lr, sweep.settings[0][1]))] for t in range(len(expected))]
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
            if bench["warmup_epochs"] == 0:  # the release's zero warm-up: never above lr/10
                assert max(got) == pytest.approx(lr / 10)


def test_accumulation_divides_a_short_last_group_as_the_release():
    feats, labels = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    grads = {}
    for rule in ("release", "exact"):
        cfg = probe_config(_toy_params(rule), "rand", "bench_b", ["linear"]).sweep("linear")
        bank = HeadBank("linear", 4, 2, [(0.0, 0.0)])
        trainer = BankTrainer(bank, cfg, batches_per_epoch=3, device=torch.device("cpu"))
        trainer.micro_batch(0, feats, labels)
        trainer.micro_batch(1, feats, labels)  # steps (lr 0)
        bank.zero_grad()
        trainer.optimizer.step = lambda: None  # keep the last group's gradient to look at it
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.micro_batch(2, feats, labels)  # the short last group: 1 micro-batch of accum_steps 2
        grads[rule] = bank.heads[0].linear.weight.grad.clone()
    torch.testing.assert_close(grads["release"] * 2, grads["exact"])


def _toy_params(rule: str) -> dict:
    from xtra.config import validate_params

    return validate_params(
        {
            "profile": "t",
            "datasets": {"d": {"kind": "digits"}},
            "models": {"rand": {"init": "random"}},
            "probe": {
                "benchmarks": {"bench_b": {"dataset": "d", "eval_split": "test", "accum_steps": 2}},
                "last_group_loss": rule,
                "grad_clip": 0.0,
            },
        },
        check_paths=False,
    )


def test_cached_features_give_each_rank_its_share():
    feats, labels = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    one = CachedFeatures(feats, labels, batch_size=4, seed=3)
    global_batches = [y.tolist() for _, y in one.epoch(1)]
    assert len(global_batches) == 2  # drop_last
    shares = []
    for rank in (0, 1):
        part = CachedFeatures(feats, labels, batch_size=4, seed=3)
        part.rank, part.world, part.batch_size = rank, 2, 2
        shares.append([y.tolist() for _, y in part.epoch(1)])
    for i, batch in enumerate(global_batches):
        assert sorted(batch) == sorted(shares[0][i] + shares[1][i])


def test_pixel_floor_is_probed_linear_only(inputs, tmp_path):
    from xtra.probe.pixels import write_pixels_model

    params = _params(inputs, "pixels")
    params["models"]["pix"] = {**params["models"]["rand"], "init": "pixels"}
    path = write_pixels_model("pix", params["models"]["pix"]["arch"], Path(params["paths"]["models"]) / "pix")
    assert path.name == "model.pt" and json.loads((path.parent / "metrics.json").read_text())["init"] == "pixels"
    assert [j.kinds for j in plan_jobs(params, "pix", ["bench_b"])] == [("linear",)]
    with pytest.raises(ParamsError, match="pixel floor"):
        plan_jobs(params, "pix", ["bench_b"], ["attentive"])
    assert probe_model(params, "pix", ["bench_b"], use_ray=False) == 0
    result = json.loads((Path(params["paths"]["results"]) / "probe" / "pix" / "bench_b-linear.json").read_text())
    assert result["kind"] == "linear" and 0 <= result["top1"] <= 100
    assert not (Path(params["paths"]["results"]) / "probe" / "pix" / "bench_b-attentive.json").exists()


@pytest.mark.slow  # starts a local Ray
@pytest.mark.timeout(400)
def test_a_ray_retry_continues_from_the_saved_epoch(inputs, tmp_path, monkeypatch):
    import ray

    from xtra.probe.driver import ATTEMPT_LOG_ENV, FAIL_AFTER_ENV, init_ray

    reference = _run(inputs, "ray_reference", augment=True)
    params = _params(inputs, "ray_retried", augment=True)
    attempts = tmp_path / "attempts.log"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")  # the first attempt raises after saving epoch 2 of 3
    monkeypatch.setenv(ATTEMPT_LOG_ENV, str(attempts))
    init_ray(num_cpus=2)
    try:
        assert probe_model(params, "rand", ["bench_b"]) == 0
    finally:
        ray.shutdown()
    assert attempts.read_text().splitlines() == ["rand/bench_b"] * 2  # Ray retried the task once
    cfg = probe_config(params, "rand", "bench_b")
    log = state_path(cfg).with_suffix(".log").read_text().splitlines()
    assert log[:2] == ["start epoch 0", "resume epoch 2"]  # the retry continued instead of restarting
    assert log[2].startswith("finished in ")
    banks, results = _outcome(params, BOTH)
    banks_ref, results_ref = _outcome(reference, BOTH)
    for kind in BOTH:
        _same(banks[kind], banks_ref[kind], atol=0)
        assert results[kind]["top1"] == results_ref[kind]["top1"]


def test_a_local_ray_is_sized_by_the_cpu_affinity_not_the_machine(monkeypatch):
    from xtra.probe.driver import allocated_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # e.g. Slurm bound this job to one core
    assert allocated_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4096)))
    assert allocated_cpus() <= (os.cpu_count() or 1)  # the cgroup / machine count caps it


def _environments(params: dict, kind: str = "linear") -> list[dict]:
    result = Path(params["paths"]["results"]) / "probe" / "rand" / f"bench_b-{kind}.json"
    return json.loads(result.read_text())["environments"]


@pytest.mark.timeout(300)
def test_each_result_records_the_thread_count_the_job_set(inputs, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job sets it (probe.resources.threads); restored after
    for threads in (1, 2):
        params = _params(inputs, f"threads_{threads}")
        params["probe"]["resources"]["threads"] = threads
        assert probe_model(params, "rand", ["bench_b"], ["linear"], use_ray=False) == 0
        assert torch.get_num_threads() == threads
        (segment,) = _environments(params)
        assert segment["from_epoch"] == 0
        assert {k: segment["environment"][k] for k in ("threads", "ranks", "device")} == {
            "threads": threads,
            "ranks": 1,
            "device": "cpu",
        }
        assert segment["environment"]["torch"] == torch.__version__ and segment["environment"]["device_name"]


@pytest.mark.timeout(300)
def test_a_job_resumed_under_another_thread_count_records_both_and_says_so(inputs, monkeypatch, capsys):
    from xtra.probe.driver import FAIL_AFTER_ENV

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = _params(inputs, "threads_resumed")
    params["probe"]["resources"]["threads"] = 1
    params["probe"]["ray"]["max_retries"] = 0
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")  # fails after saving epoch 2 of 3
    assert probe_model(params, "rand", ["bench_b"], ["linear"], use_ray=False) == 1
    monkeypatch.delenv(FAIL_AFTER_ENV)
    params["probe"]["resources"]["threads"] = 2  # resubmitted with another thread count: continues
    assert probe_model(params, "rand", ["bench_b"], ["linear"], use_ray=False) == 0
    first, second = _environments(params)
    assert (first["from_epoch"], first["environment"]["threads"]) == (0, 1)
    assert (second["from_epoch"], second["environment"]["threads"]) == (2, 2)
    assert "resumed at epoch 2 in another environment (threads: 1 -> 2)" in capsys.readouterr().out
    log = state_path(probe_config(params, "rand", "bench_b", ["linear"])).with_suffix(".log").read_text()
    assert log.splitlines()[:3] == [
        "start epoch 0",
        "resume epoch 2",
        "resumed at epoch 2 in another environment (threads: 1 -> 2)",
    ]
