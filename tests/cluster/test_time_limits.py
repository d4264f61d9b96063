"""The cluster profiles ask for the warning signal before a pre-training's time limit, and tell each job its
attempt number (workflow/rules/common.smk; docs/pipeline.md, "Time limits").

Not marked `cluster`: Snakemake plans the paper H/14 profile with `-n -p` (a few seconds, no scheduler), and the
test reads the plugins' resources and the shell lines: the multi-task pre-training's `slurm_extra` carries
`--signal=USR1@300` (which the Slurm plugin accepts: none of the options it manages), its `lsf_extra` carries
`-wa USR1 -wt 5` (LSF counts minutes); a one-task job gets no warning (its job step holds the plugin's own
Snakemake, which SIGUSR1 would end); every pre-training's shell line exports XTRA_ATTEMPT.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from xtra.cli import main as xtra_main

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def h14_repo(tmp_path_factory) -> Path:
    """A copy of the working tree's tracked and new files, on the paper H/14 profile."""
    dest = tmp_path_factory.mktemp("h14")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    assert xtra_main(["profile", "paper_h14", "--params", str(dest / "params.yaml")]) == 0
    return dest


def _plan(repo: Path, profile: str, *config: str) -> dict[str, tuple[dict[str, str], str]]:
    """rule -> (its resources, its shell line) of `snakemake -n -p --profile workflow/profiles/<profile>`."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = [str(BIN / "snakemake"), "-n", "-p", "--profile", f"workflow/profiles/{profile}"]
    if config:
        args += ["--config", *config]
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs: dict[str, tuple[dict[str, str], str]] = {}
    rule = ""
    for line in proc.stdout.splitlines():
        if head := re.match(r"^(?:local)?rule ([\w-]+):$", line):
            rule = head.group(1)
            jobs[rule] = ({}, "")
        elif line.startswith("    resources: ") and rule:
            pairs = (item.split("=", 1) for item in line.removeprefix("    resources: ").split(", ") if "=" in item)
            jobs[rule] = ({k: v for k, v in pairs}, jobs[rule][1])
        elif line.startswith("Shell command: ") and rule:
            jobs[rule] = (jobs[rule][0], line.removeprefix("Shell command: "))
    return jobs


def test_the_slurm_profile_warns_a_multi_task_pretraining_before_its_time_limit(h14_repo: Path) -> None:
    from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options

    profile = yaml.safe_load((h14_repo / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["retries"] >= 10  # attempts enough for a run many time limits long
    jobs = _plan(h14_repo, "slurm")
    resources, shell = jobs["pretrain-xtra_h14"]  # 8 nodes x 8 tasks
    assert resources["slurm_extra"] == "--signal=USR1@300"
    assert not [name for pattern, name in get_forbidden_slurm_options().items() if re.search(pattern, "--signal")]
    assert shell.startswith("XTRA_ATTEMPT=1 srun --nodes=8 --ntasks-per-node=8 ")
    assert "slurm_extra" not in jobs["pretrain-pixels"][0]  # one task: no warning
    assert jobs["pretrain-pixels"][1].startswith("XTRA_ATTEMPT=1 xtra pretrain pixels ")
    assert all("slurm_extra" not in res for rule, (res, _) in jobs.items() if not rule.startswith("pretrain-"))


def test_the_lsf_profile_warns_a_multi_task_pretraining_before_its_time_limit(h14_repo: Path) -> None:
    profile = yaml.safe_load((h14_repo / "workflow/profiles/lsf/config.yaml").read_text())
    assert profile["retries"] >= 10
    # a lead of its own (seconds; -wt counts minutes); --config replaces the profile's, so scheduler too
    jobs = _plan(h14_repo, "lsf", "scheduler=lsf", "signal_lead=600")
    resources, shell = jobs["pretrain-xtra_h14"]
    assert resources["lsf_extra"] == "-gpu num=8 -wa USR1 -wt 10"
    assert shell.startswith("XTRA_ATTEMPT=1 jsrun --nrs 64 ")
    assert all("-wa" not in res.get("lsf_extra", "") for rule, (res, _) in jobs.items() if rule != "pretrain-xtra_h14")
