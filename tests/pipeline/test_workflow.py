"""The two DAG front-ends plan the same pipeline: dvc.yaml (local, cached, experiments) and
workflow/Snakefile (clusters), both made from xtra/pipeline/dag.py's stage table, for the demo and
both paper profiles, with the cluster requests of the paper runs (dvc.yaml has one stage more,
`check`); dvc.yaml is current; its check stage stops a run of stale or incomplete params; DVC
re-runs only what a params change touches; the code deps are complete. (tests/pipeline/test_staleness.py
runs the edits through both front-ends.)

Everything that may write state (.dvc/tmp, .snakemake) runs in copies of the repository made from
`git ls-files` (tracked and untracked-but-not-ignored files: no data, models, results or venv).
The Snakemake runs are subprocesses started together at the start of the module: each imports
torch through the params cross-checks, so one after the other they would take a minute.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from xtra.cli import main as xtra_main
from xtra.pipeline.dvc_yaml import CHECK_STAGE, check_stamp

BIN = Path(sys.executable).parent
STAGES = ("prepare", "pretrain", "probe", "report")


def repo_copy(dest: Path, profile: str = "demo") -> Path:
    """A copy of the working tree's source files (a git repo, as DVC wants one), on `profile`."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        src, dst = REPO / name, dest / name
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    if profile != "demo":
        assert xtra_main(["profile", profile, "--params", str(dest / "params.yaml")]) == 0
    return dest


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- Snakemake dry-run output


@dataclass
class Job:
    rule: str
    fields: dict[str, str] = field(default_factory=dict)
    shell: str = ""

    @property
    def outputs(self) -> list[str]:
        """The output paths, without Snakemake's flag notes (a prepared manifest is `... (update)`)."""
        return [re.sub(r"\s*\(\w+\)$", "", o.strip()) for o in self.fields.get("output", "").split(",") if o.strip()]

    @property
    def resources(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.fields.get("resources", "").split(", ") if "=" in item)
        return {k.strip(): v.strip() for k, v in pairs}


def parse_dry_run(text: str) -> list[Job]:
    """The job blocks of `snakemake -n -p` output: `rule NAME:`, indented `key: value`, `Shell command:`."""
    jobs: list[Job] = []
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule ([\w-]+):$", line)
        if head:
            jobs.append(Job(head.group(1)))
        elif jobs and (item := re.match(r"^    (\w+): (.*)$", line)):
            jobs[-1].fields[item.group(1)] = item.group(2)
        elif jobs and line.startswith("Shell command: "):
            jobs[-1].shell = line.removeprefix("Shell command: ")
    return jobs


def command_of(shell: str) -> str:
    """The `xtra ...` command of a shell line, without its launcher prefix and log redirection."""
    command = shell[shell.index("xtra ") :]
    return re.sub(r"\s*>\s*\S+\s+2>&1\s*$", "", command)


# ---------------------------------------------------------------- the runs, started together


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    made = {
        "demo": "demo",
        "b16": "paper_b16",
        "h14": "paper_h14",
        "h14_slurm": "paper_h14",
        "h14_lsf": "paper_h14",
        "lint": "demo",
        "status": "demo",
    }
    return {key: repo_copy(tmp_path_factory.mktemp(key), profile) for key, profile in made.items()}


@pytest.fixture(scope="module")
def snakemake_runs(copies) -> dict[str, Future]:
    snakemake = str(BIN / "snakemake")
    commands = {
        "demo": ([snakemake, "-n"], copies["demo"]),
        "b16": ([snakemake, "-n"], copies["b16"]),
        "h14_slurm": ([snakemake, "-n", "--profile", "workflow/profiles/slurm"], copies["h14_slurm"]),
        "h14_lsf": ([snakemake, "-n", "--profile", "workflow/profiles/lsf"], copies["h14_lsf"]),
        "lint": ([snakemake, "--lint"], copies["lint"]),
        "configfile": ([snakemake, "-n", "--configfile", "profiles/paper_b16.yaml"], copies["lint"]),
    }
    pool = ThreadPoolExecutor(max_workers=len(commands))
    yield {key: pool.submit(run, args, cwd) for key, (args, cwd) in commands.items()}
    pool.shutdown(wait=True)


def dry_run(snakemake_runs, key: str) -> list[Job]:
    proc = snakemake_runs[key].result()
    assert proc.returncode == 0, f"snakemake ({key}) exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    jobs = parse_dry_run(proc.stdout + "\n" + proc.stderr)
    assert jobs, f"no job in the dry-run output ({key})"
    return jobs


def dvc_stages(path: Path) -> dict[str, dict]:
    """name -> {kind, cmd, outs, deps} of every stage of dvc.yaml, as DVC itself resolves them."""
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        return {
            s.name: {
                "kind": s.name.split("-")[0],
                "cmd": s.cmd,
                "outs": sorted(o.def_path for o in s.outs),
                "deps": [d.def_path for d in s.deps],
            }
            for s in repo.index.stages
        }


# ---------------------------------------------------------------- the two front-ends agree


def assert_same_pipeline(stages: dict[str, dict], jobs: list[Job], params: dict) -> None:
    """The same stages under the same names, with the same outputs and the same commands; dvc.yaml
    has one more, `check`, on which every other stage depends (Snakemake checks when it parses)."""
    jobs = {j.rule: j for j in jobs if j.rule != "all"}
    stages = dict(stages)
    check = stages.pop(CHECK_STAGE)
    assert check["outs"] == [check_stamp(params)]
    assert all(check_stamp(params) in s["deps"] for s in stages.values())
    assert set(stages) == set(jobs)
    for name, stage in stages.items():
        assert stage["outs"] == sorted(jobs[name].outputs), name
        assert command_of(jobs[name].shell) == stage["cmd"], name
    assert {s["kind"] for s in stages.values()} == set(STAGES)
    assert sum(s["kind"] == "probe" for s in stages.values()) == n_probe_stages(params)


def n_probe_stages(params: dict) -> int:
    """One per (probed model, benchmark) with a kind to probe (the pixel floor: linear only)."""
    from xtra.config import validate_params
    from xtra.pipeline.dag import probe_kinds

    params = validate_params(json.loads(json.dumps(params)), check_paths=False)
    models = params["probe"].get("models") or params["models"]
    return sum(bool(probe_kinds(params, m, b)) for m in models for b in params["probe"]["benchmarks"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["demo", "b16", "h14_slurm"])
def test_dvc_and_snakemake_plan_the_same_pipeline(key, copies, snakemake_runs):
    path = copies[key]
    params = yaml.safe_load((path / "params.yaml").read_text())
    stages, jobs = dvc_stages(path), dry_run(snakemake_runs, key)
    assert_same_pipeline(stages, jobs, params)
    counts = {kind: sum(s["kind"] == kind for s in stages.values()) for kind in (*STAGES, CHECK_STAGE)}
    assert counts == {
        "prepare": len(params["datasets"]),
        "pretrain": len(params["models"]),
        "probe": n_probe_stages(params),
        "report": 1,
        CHECK_STAGE: 1,
    }


def test_shipped_dvc_yaml_is_the_stage_table_of_params_yaml():
    """dvc.yaml is written by `xtra dag`; a changed import, dataset or benchmark needs a rewrite."""
    from xtra.config import load_params
    from xtra.pipeline.dvc_yaml import dvc_yaml_problem

    assert dvc_yaml_problem(load_params(REPO / "params.yaml", check_paths=False), REPO) is None


def test_snakemake_plans_the_shipped_params_with_every_init(tmp_path):
    """Fast guard of the cluster front-end (its other tests are slow): Snakemake's own schema
    validation fills defaults, and a default under a null section (`backbone: null`) broke every
    `snakemake` call once while the DVC demo stayed green."""
    path = repo_copy(tmp_path / "repo")
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["models"]["mae_tiny"] = {
        **params["models"]["random_k2"],
        "init": "backbone",
        "checkpoint": "weights/mae_tiny.safetensors",
        "backbone": {"name": "mae_b16"},
    }
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "weights").mkdir()
    (path / "weights/mae_tiny.safetensors").write_bytes(b"")  # an input of the plan, not read by -n
    proc = run([str(BIN / "snakemake"), "-n"], path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {job.rule for job in parse_dry_run(proc.stdout + "\n" + proc.stderr)}
    assert {"pretrain-xtra_k2", "pretrain-mae_tiny", "probe-mae_tiny-mnist", "report"} <= jobs


def test_profile_switch_rewrites_dvc_yaml(copies):
    from xtra.config import load_params
    from xtra.pipeline.dvc_yaml import dvc_yaml_problem

    for key in ("b16", "h14"):
        path = copies[key]
        assert dvc_yaml_problem(load_params(path / "params.yaml", check_paths=False), path) is None, key


def _jobs_by_rule(jobs: list[Job]) -> dict[str, list[Job]]:
    by_rule: dict[str, list[Job]] = {}
    for job in jobs:
        by_rule.setdefault(job.rule.split("-")[0], []).append(job)
    return by_rule


def _check_h14_plan(jobs: list[Job]) -> dict[str, list[Job]]:
    by_rule = _jobs_by_rule(jobs)
    # 15 benchmarks of xtra_h14, and in1k linear for the pixel floor
    assert {rule: len(js) for rule, js in by_rule.items()} == {
        "prepare": 16,
        "pretrain": 2,
        "probe": 16,
        "report": 1,
        "all": 1,
    }
    by_rule["pretrain"].sort(key=lambda j: j.rule != "pretrain-xtra_h14")  # the trained model first
    inputs = by_rule["pretrain"][0].fields["input"].split(", ")
    assert inputs == ["data/prepared/imagenet21k/manifest.json"]  # no code: its recipe version stands for it
    assert by_rule["pretrain"][0].resources["runtime"] == "2880"
    assert by_rule["pretrain"][1].fields.get("input", "") == ""  # pixels: it reads nothing
    return by_rule


@pytest.mark.slow
def test_slurm_plan_of_the_h14_profile(snakemake_runs):
    by_rule = _check_h14_plan(dry_run(snakemake_runs, "h14_slurm"))
    pretrain = by_rule["pretrain"][0]
    # 8 nodes x 8 GPUs: one task per GPU, started by srun inside the allocation
    assert {
        k: pretrain.resources.get(k) for k in ("nodes", "gres", "tasks_per_node", "cpus_per_task", "mpi", "mem_mb")
    } == {
        "nodes": "8",
        "gres": "gpu:8",
        "tasks_per_node": "8",
        "cpus_per_task": "8",
        "mpi": "srun --nodes=8 --ntasks-per-node=8 --cpus-per-task=8",
        "mem_mb": "400000",
    }
    assert pretrain.shell.startswith(
        "XTRA_ATTEMPT=1 srun --nodes=8 --ntasks-per-node=8 --cpus-per-task=8 xtra pretrain xtra_h14 "
    )
    for job in by_rule["probe"]:
        if job.rule.endswith("-in1k"):  # one task with the 8 GPUs of one node: it starts a process per GPU itself
            assert (job.resources["gpu"], job.resources["nodes"], job.resources["cpus_per_task"]) == ("8", "1", "8")
            assert "mpi" not in job.resources and "tasks_per_node" not in job.resources
            assert "gres" not in job.resources
            continue
        assert (job.resources["gpu"], job.resources["nodes"], job.resources["cpus_per_task"]) == ("1", "1", "16")
        assert "mpi" not in job.resources and job.shell.startswith("xtra probe xtra_h14 --benchmark ")
    in1k = [j for j in by_rule["probe"] if j.rule == "probe-xtra_h14-in1k"]
    assert {j.resources["runtime"] for j in in1k} == {"720"}  # the benchmark's own request wins
    for job in by_rule["prepare"]:
        assert "gpu" not in job.resources and "gres" not in job.resources and job.resources["nodes"] == "1"
    assert "nodes" not in by_rule["report"][0].resources  # a local rule


@pytest.mark.slow
def test_lsf_plan_of_the_h14_profile(snakemake_runs):
    by_rule = _check_h14_plan(dry_run(snakemake_runs, "h14_lsf"))
    pretrain = by_rule["pretrain"][0]
    # bsub -n 512 (64 tasks x 8 cores), span[ptile=64] (8 hosts), -gpu num=8 per host, jsrun
    assert {k: pretrain.resources.get(k) for k in ("cpus_per_task", "ptile", "lsf_extra", "mem_mb")} == {
        "cpus_per_task": "512",
        "ptile": "64",
        "lsf_extra": "-gpu num=8 -wa USR1 -wt 5",
        "mem_mb": "3200000",
    }
    assert pretrain.resources["mpi"].startswith("jsrun --nrs 64 ") and pretrain.shell.startswith(
        "XTRA_ATTEMPT=1 jsrun --nrs 64 "
    )
    for job in by_rule["probe"]:
        if job.rule.endswith("-in1k"):  # 8 GPUs of one host
            assert job.resources["lsf_extra"] == "-gpu num=8"
            continue
        assert (job.resources["lsf_extra"], job.resources["cpus_per_task"]) == ("-gpu num=1", "16")
        assert "mpi" not in job.resources and "ptile" not in job.resources
    assert all("lsf_extra" not in j.resources for j in by_rule["prepare"])


@pytest.mark.slow
def test_snakemake_lint_is_clean(snakemake_runs):
    proc = snakemake_runs["lint"].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_snakemake_refuses_a_config_that_is_not_params_yaml(snakemake_runs):
    """--configfile would deep-merge two profiles; the xtra commands would not see it anyway."""
    proc = snakemake_runs["configfile"].result()
    assert proc.returncode != 0 and "xtra profile NAME" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- DVC re-runs only what changed


def _fake_outputs(path: Path, stages: dict[str, dict]) -> None:
    """Stand-ins for every stage output (the check stage's own), so that DVC can record a complete lock file."""
    for name, stage in stages.items():
        if name == CHECK_STAGE:
            stamp = ["--stamp", str(path / stage["outs"][0])]
            assert xtra_main(["dag", "--check", "--params", str(path / "params.yaml"), *stamp]) == 0
            continue
        for out in stage["outs"]:
            target = path / out
            if target.suffix in (".pt", ".json", ".csv"):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"{out}\n")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / "part.txt").write_text(f"{out}\n")


def _changed(path: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        return set(repo.status()) - {CHECK_STAGE}  # always_changed; its constant output changes nothing


def _edit(path: Path, key: str, value) -> None:
    from xtra.pipeline.profiles import apply_overrides

    params = yaml.safe_load((path / "params.yaml").read_text())
    (path / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, [f"{key}={json.dumps(value)}"])))


@pytest.mark.slow
def test_dvc_reruns_only_the_stages_a_params_change_touches(copies, monkeypatch):
    from dvc.repo import Repo

    path = copies["status"]
    monkeypatch.chdir(path)  # DVC's in-process API resolves some paths against the working directory
    original = (path / "params.yaml").read_text()
    _fake_outputs(path, dvc_stages(path))
    with Repo(str(path)) as repo:
        repo.commit(None, force=True)
    assert _changed(path) == set()
    cache = path / "xtra" / "report" / "__pycache__"  # Python writes these into a dependency folder
    cache.mkdir(exist_ok=True)
    (cache / "cli.cpython-311.pyc").write_bytes(b"\0")
    assert _changed(path) == set(), "byte code changed a stage (see .dvcignore)"
    # `dvc status` names the stages whose own deps changed (tests/pipeline/test_staleness.py adds the downstream ones)
    probes = {f"probe-{m}-{b}" for m in ("xtra_k2", "xtra_k1", "random_k2", "pixels") for b in ("mnist", "digits")}
    cases = [
        ("probe.benchmarks.mnist.lrs", [0.001, 0.01], {p for p in probes if p.endswith("-mnist")}),
        ("probe.grad_clip", 2.0, probes),
        # a kind's settings reach the stages that train it: the pixel floor is probed by the linear kind only
        ("probe.kinds.attentive.num_last_blocks", 2, {p for p in probes if not p.startswith("probe-pixels-")}),
        ("probe.kinds.linear.weight_decays", [0.01], probes),
        ("probe.ray.max_retries", 4, set()),
        ("probe.resources.mem_mb", 9000, set()),
        ("models.xtra_k1.train.epochs", 5, {"pretrain-xtra_k1"}),
        ("models.xtra_k1.train.num_workers", 0, set()),  # the stream's order does not depend on it
        ("models.random_k2.train.epochs", 5, set()),
        ("models.pixels.arch.img_size", 48, {"pretrain-pixels", "probe-pixels-mnist", "probe-pixels-digits"}),
        ("report.dpi", 100, {"report"}),
        ("datasets.digits.heldout_fraction", 0.3, {"prepare-digits"}),
        ("datasets.digits.num_workers", 1, set()),
    ]
    for key, value, expected in cases:
        _edit(path, key, value)
        assert _changed(path) == expected, key
        (path / "params.yaml").write_text(original)
    assert _changed(path) == set()


# ---------------------------------------------------------------- no code deps, a recipe version each


def test_stages_depend_on_their_recipe_version_and_no_code(copies):
    """A refactor re-runs nothing (xtra/identity.py): no stage of dvc.yaml depends on a source file;
    each depends on its kind's recipe version (xtra/recipes.yaml, a params file of the stage)."""
    import yaml as pyyaml

    stages = pyyaml.safe_load((copies["demo"] / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        code = [d for d in stage.get("deps", []) if str(d).startswith("xtra/") and str(d).endswith(".py")]
        assert code == [], f"{name} depends on code {code}"
        if name == CHECK_STAGE:
            continue
        recipes = [p for p in stage["params"] if isinstance(p, dict) and "xtra/recipes.yaml" in p]
        assert recipes == [{"xtra/recipes.yaml": [name.split("-")[0]]}], name


def test_dvc_data_deps_are_files_the_pipeline_or_the_package_holds():
    """A dependency that does not exist makes `dvc repro` fail on a fresh clone: every dep is another
    stage's output, the check stamp, or a file of the repository."""
    import yaml as pyyaml

    stages = pyyaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    outs |= {next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])}
    missing = [d for s in stages.values() for d in s.get("deps", []) if d not in outs and not (REPO / d).exists()]
    assert not missing, missing


def test_one_schema_for_both_front_ends():
    link = REPO / "workflow" / "schemas" / "params.schema.yaml"
    assert link.is_symlink() and link.resolve() == (REPO / "xtra" / "schema" / "params.schema.yaml").resolve()


def test_the_check_stage_refuses_stale_or_incomplete_params(tmp_path, capsys):
    """`xtra dag --check --stamp` (dvc.yaml's first stage) passes on the shipped files and writes its
    constant stamp; a params change that alters the stage table, or a params file that leaves a key
    out, fails, naming the fix and writing no stamp; an invalid file fails naming the key."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    stamp = tmp_path / "results" / ".params-checked"
    check = ["dag", "--check", "--params", str(tmp_path / "params.yaml"), "--stamp", str(stamp)]
    assert xtra_main(check) == 0
    text = stamp.read_text()
    stamp.unlink()
    assert xtra_main(check) == 0 and stamp.read_text() == text  # constant: nothing after it becomes stale
    stamp.unlink()
    original = (tmp_path / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["probe"]["models"] = ["xtra_k2"]  # what `dvc exp run -S 'probe.models=[xtra_k2]'` would write
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert xtra_main(check) == 1 and not stamp.exists()
    assert "run `xtra dag`" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text(original.replace("  min_lr: 1.0e-05\n", "", 1))
    assert xtra_main(check) == 1 and not stamp.exists()
    assert re.search(r"leaves out \['probe.min_lr'\].*xtra profile --fill", capsys.readouterr().err)
    (tmp_path / "params.yaml").write_text(original.replace("  grad_clip: 3.0\n", "  grad_clip: -3.0\n", 1))
    assert xtra_main(check) == 2 and "probe.grad_clip" in capsys.readouterr().err


def test_the_cli_is_a_leaf():
    """No module of the package imports xtra.cli (it imports the commands, lazily)."""
    importers = []
    for path in sorted((REPO / "xtra").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "xtra.cli" in names or (
                isinstance(node, ast.ImportFrom) and node.module == "xtra" and any(a.name == "cli" for a in node.names)
            ):
                importers.append(path.relative_to(REPO).as_posix())
    assert importers == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_repro_runs_only_the_check_and_stops_on_a_stale_table(tmp_path):
    """With real DVC and the stand-in `xtra` (tests/fixtures/fake_xtra.py) for the stage commands: an
    up-to-date pipeline's `dvc repro` runs only `check`; a benchmark added to params.yaml without
    `xtra dag` makes plain `dvc repro` stop at its first stage with the project's message and a
    non-zero exit, running no other stage; `dvc exp run -S` still runs (and re-runs what it changes)."""
    from tests.pipeline.test_staleness import _run, copy_with_fake_xtra

    path = copy_with_fake_xtra(tmp_path / "repo")
    dvc = str(BIN / "dvc")
    _run([dvc, "repro", "-q"], path)
    (path / "RAN").unlink()
    again = _run([dvc, "repro"], path)
    assert re.findall(r"Running stage '([^']+)'", again.stdout) == [CHECK_STAGE], again.stdout
    assert not (path / "RAN").exists()
    original = (path / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["probe"]["benchmarks"]["digits2"] = {**params["probe"]["benchmarks"]["digits"], "epochs": 3}
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = _run([dvc, "repro"], path, check=False)
    assert stale.returncode != 0
    assert "run `xtra dag`" in stale.stdout + stale.stderr
    assert re.findall(r"Running stage '([^']+)'", stale.stdout) == [CHECK_STAGE]
    assert not (path / "RAN").exists()
    (path / "params.yaml").write_text(original)
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    _run([*git, "add", "-A"], path)
    _run([*git, "commit", "-qm", "run"], path)
    exp = _run([dvc, "exp", "run", "-S", "probe.benchmarks.mnist.lrs=[0.001,0.01]"], path)
    assert exp.returncode == 0
    assert set((path / "RAN").read_text().split()) == {
        f"probe-{m}-mnist" for m in ("xtra_k2", "xtra_k1", "random_k2", "pixels")
    } | {"report"}


def test_the_pipelines_never_write_the_readme():
    import argparse

    from xtra.report.cli import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args([]).readme is None
    assert "--readme" not in (REPO / "dvc.yaml").read_text()
    assert not any("--readme" in p.read_text() for p in (REPO / "workflow").rglob("*.smk"))
