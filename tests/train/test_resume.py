"""Exact resume: a run SIGKILLed right after a checkpoint and re-run with the same command ends with the
weights of a run never interrupted (1 process; 2- and 4-process gloo DDP; mid-epoch and epoch boundary),
also when the re-run has another number of loader workers (the stream's order does not depend on it).

The tiny 16-px model trains on 24 images, 2 epochs, a checkpoint every 2 steps; drop path and
pseudo-random block orders are on. One process takes batches of 4 (6 an epoch); DDP ranks take 6
batches each an epoch too (2 ranks x 2 images, 4 ranks x 1 image).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures.pretrain import final_weights, max_weight_difference, run_pretrain, tiny_params


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _killed_then_resumed(directory: Path, params: dict, prepared: Path, step: int, resume_workers: int = 0) -> str:
    """Kill the run right after step `step`'s checkpoint, re-run it with `resume_workers` loader workers."""
    killed = run_pretrain(directory, params, prepared, kill_after=step)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (directory / "models" / "m" / "model.pt").exists()
    train = {**params["models"]["m"]["train"], "num_workers": resume_workers}
    resumed = run_pretrain(directory, {**params, "models": {"m": {**params["models"]["m"], "train": train}}}, prepared)
    _check(resumed)
    assert "differs from run" not in resumed.stdout  # the same run: num_workers is not part of its identity
    return resumed.stdout


@pytest.fixture(scope="module")
def reference_1(small, tmp_path_factory) -> dict:
    tmp, prepared = small
    directory = tmp_path_factory.mktemp("ref1")
    _check(run_pretrain(directory, tiny_params(tmp, prepared), prepared))
    return final_weights(directory)


@pytest.fixture(scope="module")
def reference_random(small, tmp_path_factory) -> dict:
    tmp, prepared = small
    directory = tmp_path_factory.mktemp("ref_random")
    _check(run_pretrain(directory, tiny_params(tmp, prepared, loader="random"), prepared))
    return final_weights(directory)


@pytest.mark.parametrize(
    "step, where, loader, resume_workers",
    [
        (4, "mid-epoch", "stream", 2),
        (6, "epoch boundary", "stream", 1),
        pytest.param(4, "mid-epoch", "random", 2, marks=pytest.mark.slow),
        pytest.param(6, "epoch boundary", "random", 0, marks=pytest.mark.slow),
    ],
)
def test_one_process_kill_and_rerun_ends_with_the_uninterrupted_weights(
    small, request, tmp_path: Path, step: int, where: str, loader: str, resume_workers: int
) -> None:
    tmp, prepared = small
    reference_1 = request.getfixturevalue("reference_1" if loader == "stream" else "reference_random")
    params = tiny_params(tmp, prepared, loader=loader)
    out = _killed_then_resumed(tmp_path, params, prepared, step, resume_workers)
    assert "resuming from" in out and f"step-{step:06d}.ckpt" in out, out[-2000:]
    assert max_weight_difference(final_weights(tmp_path), reference_1) <= 1e-6, where
    metrics = json.loads((tmp_path / "models" / "m" / "metrics.json").read_text())
    assert metrics["steps"] == 12
    steps = [int(line.split(",")[0]) for line in (tmp_path / "models" / "m" / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13))  # the log has no gap and no duplicate step


# 6 batches a rank an epoch either way: the kill after step 4 is mid-epoch
@pytest.mark.parametrize("ranks, batch_size", [(2, 2), pytest.param(4, 1, marks=pytest.mark.slow)])
def test_ddp_kill_mid_epoch_and_rerun_ends_with_the_uninterrupted_weights(
    small, tmp_path: Path, ranks: int, batch_size: int
) -> None:
    """Bit for bit at any rank count: from 3 ranks on, a sum of the ranks' gradients depends on its order, so
    the resumed processes must reduce their first step in the bucket layout the uninterrupted run uses there
    (`RebuildBucketsOnResume`; without it, 4 ranks ended 4.8e-8 apart). The run is killed with no loader
    worker and resumed with 2 per rank."""
    tmp, prepared = small
    params = tiny_params(tmp, prepared, devices=ranks, strategy="ddp", batch_size=batch_size)
    reference = tmp_path / "reference"
    reference.mkdir()
    _check(run_pretrain(reference, params, prepared, timeout=300))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    out = _killed_then_resumed(resumed, params, prepared, step=4, resume_workers=2)
    assert "step-000004.ckpt" in out and f"on {ranks} process(es)" in out, out[-2000:]
    assert max_weight_difference(final_weights(resumed), final_weights(reference)) == 0
    metrics = json.loads((resumed / "models" / "m" / "metrics.json").read_text())
    assert metrics["world_size"] == ranks and metrics["ranks_in_sync"] and metrics["steps"] == 12


def test_a_run_resumed_under_another_thread_count_continues_records_both_and_says_so(
    small, reference_1, tmp_path: Path
) -> None:
    """`resources.threads` is no part of the run: a resume on 2 threads continues the 1-thread run; its
    final files record both segments' environments, and the log says what changed."""
    from xtra.model.artifact import read_model_artifact

    tmp, prepared = small
    params = tiny_params(tmp, prepared)
    params["models"]["m"]["resources"] = {"threads": 1}
    killed = run_pretrain(tmp_path, params, prepared, kill_after=4)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    params["models"]["m"]["resources"] = {"threads": 2}
    resumed = run_pretrain(tmp_path, params, prepared)
    _check(resumed)
    assert "resuming from" in resumed.stdout and "step-000004.ckpt" in resumed.stdout, resumed.stdout[-2000:]
    assert "2 torch thread(s)" in resumed.stdout
    assert "note: resumed at step 4 in another environment than the run's last segment (threads: 1 -> 2)" in (
        resumed.stdout
    )
    metrics = json.loads((tmp_path / "models" / "m" / "metrics.json").read_text())
    assert [(s["from_step"], s["environment"]["threads"]) for s in metrics["environments"]] == [(0, 1), (4, 2)]
    assert (
        read_model_artifact(tmp_path / "models" / "m" / "model.pt").provenance["environments"]
        == (metrics["environments"])
    )
    # not asserted: how far 2 threads move the weights from the 1-thread run (docs/pretraining.md, Determinism)
    print(
        f"max |w(1 then 2 threads) - w(1 thread)| = {max_weight_difference(final_weights(tmp_path), reference_1):.3g}"
    )


# ---------------------------------------------------------------- online probes (models.<m>.online_probe)

ONLINE = {"kinds": ["linear", "attentive"], "lrs": [1e-3, 1e-2]}


def _online_state(directory: Path) -> dict[str, torch.Tensor]:
    """The online heads' part of the run's last checkpoint (banks, AdamW moments, steps), as named tensors."""
    ckpt = sorted((directory / "models" / "m" / "checkpoints").glob("*/step-*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]["OnlineProbes"]
    flat: dict[str, torch.Tensor] = {}

    def walk(value, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}")
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, int | float):
            flat[name] = torch.tensor(float(value))

    walk(state, "online")
    return flat


def _online_log(directory: Path) -> str:
    return (directory / "models" / "m" / "online.csv").read_text()


@pytest.mark.parametrize("order", ["pseudo_random", "raster"])
def test_online_heads_change_no_weight_and_resume_exactly(small, request, tmp_path: Path, order: str) -> None:
    """Online heads on: the model ends bit for bit as without them (they are no part of its training), and a
    run killed mid-epoch ends with the weights, online heads and online log of the uninterrupted one. Raster
    order feeds them the training forward's features (hooks); pseudo-random order a raster forward of its own."""
    tmp, prepared = small
    common = {"arch": {"block_order": order}, "val_every_n_steps": 3}
    if order == "pseudo_random":
        without = request.getfixturevalue("reference_1")
    else:
        plain = tmp_path / "without"
        plain.mkdir()
        _check(run_pretrain(plain, tiny_params(tmp, prepared, **common), prepared))
        without = final_weights(plain)
    params = tiny_params(tmp, prepared, online=ONLINE, **common)
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    _check(run_pretrain(uninterrupted, params, prepared))
    assert max_weight_difference(final_weights(uninterrupted), without) == 0
    if order == "raster":  # the same weights, the same model identity: its probe results stay valid
        identities = [
            json.loads((d / "models" / "m" / "metrics.json").read_text())["identity"] for d in (plain, uninterrupted)
        ]
        assert identities[0] == identities[1]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    out = _killed_then_resumed(resumed, params, prepared, step=4)
    assert "step-000004.ckpt" in out, out[-2000:]
    assert max_weight_difference(final_weights(resumed), final_weights(uninterrupted)) <= 1e-6
    reference_heads, heads = _online_state(uninterrupted), _online_state(resumed)
    assert heads.keys() == reference_heads.keys() and any("exp_avg" in k for k in heads)
    assert max(float((heads[k] - reference_heads[k]).abs().max()) for k in heads) <= 1e-6
    assert _online_log(resumed) == _online_log(uninterrupted)
    steps = [int(line.split(",")[0]) for line in _online_log(resumed).splitlines()[1:]]
    assert steps == [s for s in (3, 6, 9, 12) for _ in range(4)]  # 2 kinds x 2 lrs, every 3 steps, no duplicate
    metrics = json.loads((resumed / "models" / "m" / "metrics.json").read_text())
    assert metrics["online"]["step"] == 12 and set(metrics["online"]["top1"]) == {"linear", "attentive"}


def test_online_heads_resume_exactly_on_two_ddp_ranks(small, tmp_path: Path) -> None:
    """2 gloo processes, online heads on (their gradients and normalisation all-reduced by themselves): killed
    mid-epoch and re-run, the model, the heads and the online log end as in the uninterrupted run."""
    tmp, prepared = small
    params = tiny_params(tmp, prepared, online=ONLINE, devices=2, strategy="ddp", batch_size=2, val_every_n_steps=3)
    reference = tmp_path / "reference"
    reference.mkdir()
    _check(run_pretrain(reference, params, prepared, timeout=300))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    out = _killed_then_resumed(resumed, params, prepared, step=4)
    assert "step-000004.ckpt" in out and "on 2 process(es)" in out, out[-2000:]
    assert max_weight_difference(final_weights(resumed), final_weights(reference)) == 0
    reference_heads, heads = _online_state(reference), _online_state(resumed)
    assert heads.keys() == reference_heads.keys()
    assert max(float((heads[k] - reference_heads[k]).abs().max()) for k in heads) <= 1e-6
    assert _online_log(resumed) == _online_log(reference)
