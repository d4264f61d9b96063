"""The demo as Slurm jobs (`snakemake --profile workflow/profiles/slurm`) equals the DVC run.

Two copies of the repository: one runs `dvc repro` here, the other submits every rule but `report`
to the test cluster with docs/pipeline.md's command for a cluster without accounting. The tables
(results/tables/top1.csv) must be byte-identical, and a second Snakemake invocation must find
nothing to do and submit no job.

The demo is reduced to every stage kind once per model kind that needs its own path (a trained
XTRA and the pixel floor; the digits benchmark): the full demo already runs through DVC in the demo
test (`pytest -m demo`), and running it twice more here took half of CI's time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.workflow import snakemake_slurm
from tests.pipeline.test_demo import _copy_repo, _dvc

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]

KEPT_MODELS, KEPT_BENCHMARKS = ("xtra_k2", "pixels"), ("digits",)


def _reduce(repo: Path) -> None:
    """params.yaml with the kept models and benchmarks only, and dvc.yaml rewritten from it (`xtra dag`)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"] = {name: params["models"][name] for name in KEPT_MODELS}
    params["probe"]["benchmarks"] = {name: params["probe"]["benchmarks"][name] for name in KEPT_BENCHMARKS}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "xtra.cli", "dag"], cwd=repo, check=True, capture_output=True)


def test_demo_on_slurm_equals_the_dvc_run_and_a_second_run_submits_nothing(slurm_cluster, tmp_path):
    dvc_repo, slurm_repo = tmp_path / "dvc", tmp_path / "slurm"
    for repo in (dvc_repo, slurm_repo):
        repo.mkdir()
        _copy_repo(repo)
        _reduce(repo)

    start = time.time()
    local = _dvc("repro", cwd=dvc_repo, timeout=3000)
    print(f"demo dvc repro: {time.time() - start:.0f} s")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    start = time.time()
    first = snakemake_slurm(slurm_repo, timeout=3600)
    took = time.time() - start
    log = first.stdout + first.stderr
    submitted = [int(i) for i in re.findall(r"has been submitted with SLURM jobid (\d+)", log)]
    print(f"demo on Slurm: {took:.0f} s, {len(submitted)} sbatch jobs")
    assert first.returncode == 0, log[-6000:] + slurm_cluster.logs()
    rules = {m.split("-")[0] for m in re.findall(r"^rule ([\w-]+):", log, flags=re.M)}
    assert {"prepare", "pretrain", "probe"} <= rules and len(submitted) >= 3, log[-3000:]
    assert not re.search(r"^rule pretrain-(xtra_k1|random_k2):", log, flags=re.M)  # the reduction held

    ours, theirs = (
        (slurm_repo / "results/tables/top1.csv").read_bytes(),
        (dvc_repo / "results/tables/top1.csv").read_bytes(),
    )
    assert ours == theirs, f"Slurm table:\n{ours.decode()}\nDVC table:\n{theirs.decode()}"

    again = snakemake_slurm(slurm_repo, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:] + again.stderr[-2000:]
    assert "submitted with SLURM jobid" not in again.stdout + again.stderr
    assert max(slurm_cluster.all_job_ids(), default=0) <= max(submitted)  # the cluster saw no new job
