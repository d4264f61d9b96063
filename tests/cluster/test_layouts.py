"""The task layouts of multi-process pre-trainings, as both cluster profiles plan them (dry runs).

- 2 CPU tasks on one node (what test_slurm_pretrain.py runs): Slurm `--ntasks-per-node=2`, the
  launcher `srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1`; LSF `-n 2 span[ptile=2]`, jsrun
  without GPUs;
- one GPU on each of 4 nodes: `--ntasks=4` plus the `--ntasks-per-node=1` Lightning's
  SLURMEnvironment insists on;
- a layout Lightning would refuse on the cluster (train.devices not the tasks per node) stops the plan.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL_ARCH, demo_params
from tests.pipeline.test_workflow import parse_dry_run, repo_copy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
MODEL = "xtra_k2"


def _params(resources: dict, **train) -> dict:
    params = demo_params()
    model = copy.deepcopy(params["models"][MODEL])
    model["arch"] = {**model["arch"], **SMALL_ARCH}  # every arch key spelled out, as params.yaml must
    model["train"].update(train)
    model["resources"] = resources
    params["models"] = {MODEL: model}
    params["probe"]["models"] = [MODEL]
    return params


def _plan(tmp: Path, profile: str, params: dict) -> subprocess.CompletedProcess:
    repo = repo_copy(tmp)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-n", "--profile", f"workflow/profiles/{profile}"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _pretrain(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(j for j in parse_dry_run(proc.stdout + "\n" + proc.stderr) if j.rule.startswith("pretrain-"))


TWO_CPU_TASKS = {"runtime": 20, "mem_mb": 4000, "cpus": 1, "gpus": 0, "nodes": 1, "tasks_per_node": 2}


def test_two_cpu_tasks_on_slurm_and_lsf(tmp_path):
    params = _params(TWO_CPU_TASKS, devices=2, num_nodes=1, strategy="ddp")
    slurm = _pretrain(_plan(tmp_path / "slurm", "slurm", params))
    launcher = "srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1"
    assert {k: slurm.resources.get(k) for k in ("nodes", "tasks_per_node", "cpus_per_task", "mpi")} == {
        "nodes": "1",
        "tasks_per_node": "2",
        "cpus_per_task": "1",
        "mpi": launcher,
    }
    assert "gres" not in slurm.resources and "tasks" not in slurm.resources
    assert slurm.resources["slurm_extra"] == "--signal=USR1@300"  # the warning before the time limit
    assert slurm.shell.startswith(f"XTRA_ATTEMPT=1 {launcher} xtra pretrain {MODEL}")
    lsf = _pretrain(_plan(tmp_path / "lsf", "lsf", params))
    assert (lsf.resources["cpus_per_task"], lsf.resources["ptile"], lsf.resources["mem_mb"]) == ("2", "2", "4000")
    assert lsf.resources["lsf_extra"] == "-wa USR1 -wt 5"
    assert lsf.shell.startswith(
        "XTRA_ATTEMPT=1 jsrun --nrs 2 --tasks_per_rs 1 --cpu_per_rs 1 --gpu_per_rs 0 --rs_per_host 2 xtra"
    )


def test_one_gpu_on_each_of_four_nodes_names_one_task_per_node(tmp_path):
    params = _params(
        {"runtime": 60, "mem_mb": 8000, "cpus": 4, "gpus": 1, "nodes": 4}, devices=1, num_nodes=4, accelerator="gpu"
    )
    job = _pretrain(_plan(tmp_path / "slurm", "slurm", params))
    assert {k: job.resources.get(k) for k in ("nodes", "tasks", "slurm_extra", "gres", "tasks_per_gpu")} == {
        "nodes": "4",
        "tasks": "4",
        "slurm_extra": "--ntasks-per-node=1 --signal=USR1@300",
        "gres": "gpu:1",
        "tasks_per_gpu": "0",
    }
    assert job.shell.startswith("XTRA_ATTEMPT=1 srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=4 xtra pretrain")


def test_a_layout_lightning_would_refuse_stops_the_plan(tmp_path):
    proc = _plan(tmp_path / "slurm", "slurm", _params(TWO_CPU_TASKS, devices=1, num_nodes=1))
    assert proc.returncode != 0
    assert f"models.{MODEL}: resources ask for 1 node(s) x 2 task(s)" in proc.stdout + proc.stderr
    assert "train.devices = 2" in proc.stdout + proc.stderr
