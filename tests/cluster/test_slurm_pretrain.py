"""A pre-training of 2 tasks (CPU, gloo) on one Slurm node, through the slurm profile, cut and resumed.

The model's request is the profile's multi-node layout at its smallest: `tasks_per_node: 2`, so
the job is `sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1` and its command starts with the
profile's launcher (`srun --nodes=1 --ntasks-per-node=2 ...`); Lightning's SLURMEnvironment reads
the ranks and the world size from srun's variables (the pre-training code parses none). The same
request with `gpus: 8, nodes: 8` is the paper run's. The run cut by `scancel` mid-epoch is
retried by Snakemake (the profile's `retries`), resumes from its checkpoints, and must end with
the weights of the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.slurm import SlurmCluster
from tests.cluster.workflow import final_weights, max_weight_difference, snakemake_slurm
from tests.conftest import SMALL_ARCH, demo_params, write_params
from tests.pipeline.test_workflow import repo_copy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]

MODEL = "xtra_k2"
REQUEST = {"runtime": 20, "mem_mb": 4000, "cpus": 1, "gpus": 0, "nodes": 1, "tasks_per_node": 2}
CUT_AT_STEP = 20  # scancel once a checkpoint at or after this step exists (an epoch is 62 steps)


def two_task_params() -> dict:
    params = demo_params()
    model = copy.deepcopy(params["models"][MODEL])
    model["arch"] = {**model["arch"], **SMALL_ARCH}  # every arch key spelled out, as params.yaml must
    model["train"].update(
        {
            "epochs": 2,
            "batch_size": 32,
            "devices": 2,
            "num_nodes": 1,
            "strategy": "ddp",
            "accelerator": "cpu",
            "num_workers": 0,
            "checkpoint_every_n_steps": 10,
            "log_every_n_steps": 5,
            "reconstruct_images": 0,
        }
    )
    model["resources"] = dict(REQUEST)
    params["models"] = {MODEL: model}
    params["probe"]["models"] = [MODEL]
    return params


def _repo(tmp: Path, prepared: Path) -> Path:
    repo = repo_copy(tmp)
    write_params(repo, two_task_params(), prepared)
    return repo


def _target(repo: Path) -> str:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    return f"{params['paths']['models']}/{MODEL}/metrics.json"


def _newest_step(ckpt_dir: Path) -> int:
    """The newest step checkpoint in checkpoints/<run id>/ (-1: none yet)."""
    steps = [int(m.group(1)) for p in ckpt_dir.rglob("step-*.ckpt") if (m := re.match(r"step-(\d+)", p.name))]
    return max(steps, default=-1)


def _cancel_mid_run(cluster: SlurmCluster, ckpt_dir: Path, proc: subprocess.Popen, timeout: float = 900) -> str:
    """scancel the running job once a checkpoint at CUT_AT_STEP or later exists; returns its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _newest_step(ckpt_dir) >= CUT_AT_STEP:
            running = cluster.job_ids()
            assert len(running) == 1, f"expected one running job, squeue lists {running}"
            subprocess.run(["scancel", running[0]], check=True)
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {CUT_AT_STEP} in {ckpt_dir} (snakemake exited {proc.poll()})")


def _job_log(repo: Path) -> str:
    return (repo / "results" / "logs" / "pretrain" / f"pretrain-{MODEL}.log").read_text()


def _check_two_ranks(repo: Path) -> None:
    log = _job_log(repo)
    members = sorted(re.findall(r"GLOBAL_RANK: (\d), MEMBER: (\d)/(\d)", log))
    assert members == [("0", "1", "2"), ("1", "2", "2")], f"ranks in the job's log: {members}\n{log[-3000:]}"
    # the trainer ran under Lightning's SLURMEnvironment (run.json records it), with its own requeue off:
    # the front-end resubmits (xtra.train.checkpoints.cluster_plugins), so Lightning sets no requeue handler
    plan = json.loads((repo / "models" / MODEL / "run.json").read_text())
    assert plan["cluster_environment"] == "SLURMEnvironment", plan["cluster_environment"]
    assert "SLURM auto-requeueing enabled" not in log, log[-3000:]


def test_two_task_pretrain_cut_by_scancel_resumes_to_the_uninterrupted_weights(slurm_cluster, prepared_demo, tmp_path):
    reference = _repo(tmp_path / "reference", prepared_demo)
    first = snakemake_slurm(reference, _target(reference))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:] + slurm_cluster.logs()
    assert re.search(r"srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 xtra pretrain", first.stdout + first.stderr)
    _check_two_ranks(reference)
    metrics = yaml.safe_load((reference / "models" / MODEL / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 * 62, metrics

    cut = _repo(tmp_path / "cut", prepared_demo)
    snakemake_log = tmp_path / "snakemake-cut.log"
    proc = snakemake_slurm(cut, _target(cut), log=snakemake_log)
    try:
        cancelled = _cancel_mid_run(slurm_cluster, cut / "models" / MODEL / "checkpoints", proc)
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = snakemake_log.read_text(errors="replace")
    assert proc.returncode == 0, out[-6000:] + slurm_cluster.logs()
    assert f"SLURM-job '{cancelled}' failed" in out and "CANCELLED" in out, out[-4000:]
    log = _job_log(cut)
    assert "resuming from" in log, log[-3000:]  # the retry's log: it went on from the cut run's checkpoint
    _check_two_ranks(cut)

    worst = max_weight_difference(final_weights(reference / "models" / MODEL), final_weights(cut / "models" / MODEL))
    print(f"2-task Slurm pre-training, cut at step >= {CUT_AT_STEP} and resumed: max |dw| = {worst:.3g}")
    assert worst <= 1e-6

    again = snakemake_slurm(cut, _target(cut))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-3000:]
