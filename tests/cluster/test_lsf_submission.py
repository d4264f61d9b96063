"""The bsub command lines of the LSF profile carry each rule's request (paper H/14 run).

No open LSF exists, so `bsub`, `bjobs` and the configuration commands are stand-ins
(tests/cluster/fake_lsf.py): Snakemake with `--profile workflow/profiles/lsf` submits one job of
each cluster rule (their inputs are placeholders), the stand-in records the submissions, and the
test reads back cores (-n), memory per core (rusage[mem=]), hosts (span[ptile=] or hosts=1), GPUs
per host (-gpu) and wall time (-W) against params.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.fake_lsf import install_fake_lsf, submissions
from tests.pipeline.test_workflow import Job, parse_dry_run, repo_copy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

BIN = Path(sys.executable).parent


def _snakemake(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PATH": os.pathsep.join([env.get("PATH", ""), str(BIN), os.environ["PATH"]])}
    return subprocess.run(
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/lsf", *args],
        cwd=repo,
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _kind(job: Job) -> str:
    return job.rule.split("-")[0]  # rules are named per stage: prepare-<dataset>, probe-<model>-<benchmark>


def _one_job_per_rule(jobs: list[Job], params: dict) -> dict[str, Job]:
    """The pre-training, the in1k probe job, and the preparation of a dataset neither of them reads."""
    pretrain = next(j for j in jobs if j.rule == "pretrain-xtra_h14")  # the trained one (not the pixel floor)
    probe = next(j for j in jobs if _kind(j) == "probe" and j.rule.endswith("-in1k"))
    read = {params["models"]["xtra_h14"]["dataset"], params["probe"]["benchmarks"]["in1k"]["dataset"]}
    prepare = next(j for j in jobs if _kind(j) == "prepare" and j.rule.removeprefix("prepare-") not in read)
    return {"prepare": prepare, "pretrain": pretrain, "probe": probe}


def _make_inputs(repo: Path, job: Job) -> None:
    """Empty placeholders for the job's missing inputs (manifests, model files; the code exists)."""
    for name in (i.strip() for i in job.fields.get("input", "").split(",") if i.strip()):
        path = repo / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def _expected(req: dict) -> tuple:
    """(cores in all, GPUs per host or None, span, runtime in minutes, memory of the job in MB) of a
    params request: one task per GPU (or tasks_per_node), `cpus` cores each, all hosts alike."""
    per_node = 1 if req.get("one_process") else req.get("tasks_per_node") or max(req["gpus"], 1)
    tasks = per_node * req["nodes"]
    span = f"span[ptile={per_node * req['cpus']}]" if tasks > 1 else "span[hosts=1]"
    return tasks * req["cpus"], req["gpus"] or None, span, req["runtime"], req["mem_mb"] * req["nodes"]


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_bsub_lines_of_the_lsf_profile_carry_each_rules_request(tmp_path):
    repo = repo_copy(tmp_path / "repo", "paper_h14")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    env = install_fake_lsf(tmp_path / "lsf")
    plan = _snakemake(repo, env, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    chosen = _one_job_per_rule(parse_dry_run(plan.stdout + "\n" + plan.stderr), params)
    # the probe job reads the pre-training's output: forcing both at once would hold the probe back
    logs = []
    for rules in (("prepare", "pretrain"), ("probe",)):
        for rule in rules:
            _make_inputs(repo, chosen[rule])
        targets = [chosen[rule].outputs[0] for rule in rules]
        run = _snakemake(repo, env, "--force", *targets, "--retries", "0", "--keep-going", "--rerun-triggers", "mtime")
        assert run.returncode != 0  # every job "EXIT"s: nothing ran, only the submissions count
        logs.append(run.stdout[-2000:] + run.stderr[-3000:])
    by_rule = {}
    for argv in submissions(tmp_path / "lsf"):
        rule = re.search(r"Snakemake_rule_(.+?)___", _option(argv, "-J")[0]).group(1)
        by_rule[rule.split("-")[0]] = argv
    assert sorted(by_rule) == ["prepare", "pretrain", "probe"], "\n".join(logs)

    model = params["models"]["xtra_h14"]["resources"]
    dataset = params["datasets"][chosen["prepare"].rule.removeprefix("prepare-")]["resources"]
    # a probe job is one process that starts one worker per GPU itself (xtra.probe.dist)
    in1k = {
        **params["probe"]["resources"],
        **(params["probe"]["benchmarks"]["in1k"].get("resources") or {}),
        "nodes": 1,
        "one_process": True,
    }
    expected = {"pretrain": _expected(model), "prepare": _expected(dataset), "probe": _expected(in1k)}
    for rule, (cores, gpus, span, runtime, mem_mb) in expected.items():
        argv = by_rule[rule]
        requests = _option(argv, "-R")
        assert _option(argv, "-n") == [str(cores)], (rule, argv)
        assert span in requests, (rule, requests)
        assert _option(argv, "-W") == [str(runtime)], (rule, argv)
        per_core = [float(m.group(1)) for r in requests if (m := re.fullmatch(r"rusage\[mem=([\d.]+)\]", r))]
        assert per_core and abs(per_core[0] * cores - mem_mb) < 1, (rule, requests)
        assert (_option(argv, "-gpu") == [f"num={gpus}"]) if gpus else ("-gpu" not in argv), (rule, argv)
    assert expected["pretrain"][2] == "span[ptile=64]" and expected["pretrain"][0] == 512  # 8 hosts x 8 GPUs x 8 cores
