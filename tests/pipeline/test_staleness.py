"""Exact staleness, the same in both front-ends: after one `dvc repro` of the demo, each edit makes
stale exactly the expected stages in `dvc status` and in `snakemake -n`; one failing probe job is
the only one the next `dvc repro` re-runs; step checkpoints and prepared shards cost DVC nothing.

The fast tests check the stage table itself (xtra/pipeline/dag.py, the one both front-ends are made from).
The slow ones run the real front-ends in a copy of the repository with a stand-in `xtra`
(tests/fixtures/fake_xtra.py) that writes each stage's declared outputs from its inputs, so the
DAG machinery, not the training, is what runs: `dvc repro`, then `snakemake --touch --forceall`
(Snakemake keeps its own provenance in .snakemake/metadata: this records that the outputs DVC
built are current for it), then each edit, both answers, and the edit undone (content and times).

After the merge of the real stage commands, `XTRA_STALENESS_REAL=1 pytest -m slow
tests/pipeline/test_staleness.py` runs the same tests on the real pipeline (a shrunk demo: 1 epoch, 2 lrs):
the stand-in then only records each run and makes the ./FAIL stage fail, and runs the real `xtra`.

"Stale" is what a run would execute: for DVC, the stages `dvc status` reports and every stage
downstream of them in DVC's own graph (`dvc status` lists only the first; a re-run stage writes
new outputs), leaving out dvc.yaml's `check` stage, which runs every time and whose constant output
makes nothing after it stale; for Snakemake, the jobs of `snakemake -n`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from xtra.identity import params_identity
from xtra.pipeline.dag import Stage, stage_table
from xtra.pipeline.dvc_yaml import CHECK_STAGE

BIN = Path(sys.executable).parent
MODELS = ("xtra_k2", "xtra_k1", "random_k2", "pixels")  # the demo's; pixels: the pixel floor (linear only)
PROBES = {f"probe-{m}-{b}" for m in MODELS for b in ("mnist", "digits")}


def probes(benchmark: str | None = None, model: str | None = None) -> set[str]:
    return {
        p
        for p in PROBES
        if (benchmark is None or p.endswith(f"-{benchmark}")) and (model is None or p.startswith(f"probe-{model}-"))
    }


# ---------------------------------------------------------------- the edits and what they make stale

NEW_KEY = "      label_smoothing: {type: number, minimum: 0, default: 0.0}\n"


def _set(key: str, value) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        from xtra.pipeline.profiles import apply_overrides

        params = yaml.safe_load((path / "params.yaml").read_text())
        (path / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, [f"{key}={json.dumps(value)}"])))

    return edit


def _code_line(name: str) -> Callable[[Path], None]:
    """A refactor: a changed line of code, no change of numerics (no stage depends on code)."""

    def edit(path: Path) -> None:
        with open(path / name, "a") as handle:
            handle.write("# a changed line (staleness test)\n")

    return edit


def _bump(kind: str) -> Callable[[Path], None]:
    """A change of numerics with its recipe version bump (xtra/recipes.yaml)."""

    def edit(path: Path) -> None:
        recipes = path / "xtra" / "recipes.yaml"
        text = recipes.read_text()
        versions = yaml.safe_load(text)
        recipes.write_text(text.replace(f"\n{kind}: {versions[kind]}\n", f"\n{kind}: {versions[kind] + 1}\n", 1))
        assert yaml.safe_load(recipes.read_text())[kind] == versions[kind] + 1

    return edit


def _schema(old: str, new: str, refill: bool = False) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        schema = path / "xtra" / "schema" / "params.schema.yaml"
        text = schema.read_text()
        assert old in text, f"the schema no longer holds {old!r}"
        schema.write_text(text.replace(old, new, 1))
        if refill:  # what a maintainer does after adding a key: fill the params files, rewrite dvc.yaml
            for args in (["profile", "--fill"], ["dag"]):
                subprocess.run(
                    [sys.executable, "-m", "xtra.cli", *args], cwd=path, env=_env(path), check=True, capture_output=True
                )

    return edit


_MIN_LR = "min_lr: {type: number, minimum: 0, default: 0.00001,"
_PROBE_MIN_LR = "      " + _MIN_LR  # the probe section's (the train section's default is 0.000001)
EDITS: list[tuple[str, Callable[[Path], None], set[str]]] = [
    ("dataset num_workers", _set("datasets.mnist5k.num_workers", 3), set()),
    ("model num_workers", _set("models.xtra_k2.train.num_workers", 3), set()),
    ("dataset image_size", _set("datasets.digits.image_size", 24), {"prepare-digits", *probes("digits"), "report"}),
    ("model lr", _set("models.xtra_k1.train.lr", 0.002), {"pretrain-xtra_k1", *probes(model="xtra_k1"), "report"}),
    ("benchmark lrs", _set("probe.benchmarks.mnist.lrs", [0.001, 0.01]), {*probes("mnist"), "report"}),
    ("probe.ray.max_retries", _set("probe.ray.max_retries", 3), set()),
    ("report.reference_models", _set("report.reference_models", ["AIM-0.6B"]), {"report"}),
    ("model resources", _set("models.xtra_k2.resources.mem_mb", 64000), set()),
    ("probe resources", _set("probe.resources.runtime", 600), set()),
    ("logging cadence", _set("models.xtra_k2.train.log_every_n_steps", 7), set()),
    ("refactor xtra/model/xtra.py", _code_line("xtra/model/xtra.py"), set()),
    ("refactor xtra/report/figures.py", _code_line("xtra/report/figures.py"), set()),
    ("pretrain recipe bump", _bump("pretrain"), {*(f"pretrain-{m}" for m in MODELS), *PROBES, "report"}),
    ("probe recipe bump", _bump("probe"), {*PROBES, "report"}),
    # params.yaml spells out every key, so an existing default changes what no command sees ...
    ("schema default", _schema(_MIN_LR, _MIN_LR.replace("0.00001", "0.0001")), set()),
    # ... and a new key reaches params.yaml through `xtra profile --fill`: the stages that read it.
    ("new schema key", _schema(_PROBE_MIN_LR, NEW_KEY + _PROBE_MIN_LR, refill=True), {*PROBES, "report"}),
]


# ---------------------------------------------------------------- fast: the stage table itself


def _table(params: dict) -> dict[str, Stage]:
    return {s.name: s for s in stage_table(params)}


def _downstream(table: dict[str, Stage], names: set[str]) -> set[str]:
    stale, grew = set(names), True
    while grew:
        outs = {o for n in stale for o in table[n].outs + table[n].metrics}
        more = {n for n, s in table.items() if n not in stale and outs & set(s.data)}
        stale |= more
        grew = bool(more)
    return stale


def _table_stale(before: dict, after: dict, bumped: str | None = None) -> set[str]:
    """The stages a params edit (and a recipe bump of stage kind `bumped`) makes stale, with downstream."""
    old, new = _table(before), _table(after)
    direct = {
        n
        for n, s in new.items()
        if n not in old or params_identity(after, s.kind, s.params) != params_identity(before, s.kind, old[n].params)
    }
    if bumped:
        direct |= {n for n, s in new.items() if s.kind == bumped}
    return _downstream(new, direct)


@pytest.mark.parametrize(
    "name,key,value,expected",
    [
        ("num_workers", "datasets.mnist5k.num_workers", 3, set()),
        ("image_size", "datasets.digits.image_size", 24, {"prepare-digits", *probes("digits"), "report"}),
        ("lr", "models.xtra_k1.train.lr", 0.002, {"pretrain-xtra_k1", *probes(model="xtra_k1"), "report"}),
        ("lrs", "probe.benchmarks.mnist.lrs", [0.001], {*probes("mnist"), "report"}),
        ("max_retries", "probe.ray.max_retries", 3, set()),
        ("reference_models", "report.reference_models", ["AIM-0.6B"], {"report"}),
        ("resources", "models.xtra_k2.resources.nodes", 2, set()),
        ("probe num_workers", "probe.num_workers", 4, set()),
        ("train num_workers", "models.xtra_k2.train.num_workers", 3, set()),
        ("threads", "models.xtra_k2.resources.threads", 1, set()),
        ("epochs", "models.xtra_k2.train.epochs", 3, {"pretrain-xtra_k2", *probes(model="xtra_k2"), "report"}),
    ],
)
def test_params_identities_change_exactly(name, key, value, expected):
    from xtra.pipeline.profiles import apply_overrides

    before = yaml.safe_load((REPO / "params.yaml").read_text())
    after = apply_overrides(before, [f"{key}={json.dumps(value)}"])
    assert _table_stale(before, after) == expected, name


TRAINED = {"pretrain-xtra_k2", "pretrain-xtra_k1"}  # the demo's models with init pretrain


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("prepare", {"prepare-mnist5k", "prepare-digits", *TRAINED, *PROBES, "report"}),
        ("pretrain", {*(f"pretrain-{m}" for m in MODELS), *PROBES, "report"}),
        ("probe", {*PROBES, "report"}),
        ("report", {"report"}),
    ],
)
def test_a_recipe_bump_reaches_exactly_its_kind_and_downstream(kind, expected):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _table_stale(params, params, kind) == expected


def test_no_stage_depends_on_code():
    """A refactor re-runs nothing: the table lists params keys and data files, never a source file."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not [d for s in stage_table(params) for d in s.data if d.endswith(".py")]


def test_inits_read_only_what_they_need():
    """random and pixels models read no prepared data; an official one reads its source checkpoint."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"]["pix"] = {**params["models"]["random_k2"], "init": "pixels"}
    params["models"]["off"] = {**params["models"]["random_k2"], "init": "official", "checkpoint": "ckpt/xtra.pth"}
    table = _table(params)
    assert table["pretrain-random_k2"].data == [] and table["pretrain-pix"].data == []
    assert table["pretrain-off"].data == ["ckpt/xtra.pth"]
    assert not any(k.startswith("models.random_k2.train") for k in table["pretrain-random_k2"].params)
    assert [o.rsplit("/", 1)[1] for o in table["probe-pix-mnist"].outs] == ["mnist-linear.json"]
    assert all("checkpoints" not in d for s in table.values() for d in s.data)


def test_report_is_keyed_on_its_section_and_the_reference_data():
    table = _table(yaml.safe_load((REPO / "params.yaml").read_text()))
    report = table["report"]
    assert "xtra/report/reference" in report.data and "report.reference_models" in report.params
    assert not any(d.endswith(".ckpt") or d.endswith("model.pt") for d in report.data)


# ---------------------------------------------------------------- slow: the two real front-ends


REAL = bool(os.environ.get("XTRA_STALENESS_REAL"))
SHRINK = [
    "models.xtra_k2.train.epochs=1",
    "models.xtra_k1.train.epochs=1",
    "probe.benchmarks.mnist.epochs=2",
    "probe.benchmarks.digits.epochs=2",
    "probe.benchmarks.mnist.lrs=[0.001, 0.01]",
    "probe.benchmarks.digits.lrs=[0.001, 0.01]",
]


def _env(path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{path / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(path),
    }
    return {**env, "XTRA_REAL": str(BIN / "xtra")} if REAL else env


def _run(args: list[str], path: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=path, env=_env(path), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def copy_with_fake_xtra(dest: Path) -> Path:
    from tests.pipeline.test_workflow import repo_copy

    repo_copy(dest)
    (dest / "bin").mkdir()
    fake = dest / "bin" / "xtra"
    fake.write_text(
        f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = 'xtra'\n"
        f"runpy.run_path({str(dest / 'tests' / 'fixtures' / 'fake_xtra.py')!r}, run_name='__main__')\n"
    )
    fake.chmod(0o755)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A demo copy after one `dvc repro`, adopted by Snakemake (its own record of the same outputs)."""
    path = copy_with_fake_xtra(tmp_path_factory.mktemp("staleness"))
    if REAL:  # a shrunk demo (the params file is then `xtra profile`'s output), dvc.yaml rewritten
        _run([sys.executable, "-m", "xtra.cli", "profile", "demo", *(f"--set={o}" for o in SHRINK)], path)
    _run([str(BIN / "dvc"), "repro", "-q"], path)
    _run([str(BIN / "snakemake"), "--touch", "--forceall", "-c1", "-q"], path)
    (path / "RAN").unlink()
    return path


def dvc_stale(path: Path) -> set[str]:
    import networkx as nx
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(path)  # DVC's in-process API resolves some paths against the working directory
    try:
        with Repo(str(path)) as repo:
            direct = set(repo.status()) - {CHECK_STAGE}  # always_changed, with a constant output
            graph = repo.index.graph  # edges: stage -> the stages it depends on
            names = {stage: stage.addressing for stage in graph.nodes}
            stale = set(direct)
            for stage, name in names.items():
                if name in direct:
                    stale |= {names[s] for s in nx.ancestors(graph, stage)}
            return stale
    finally:
        os.chdir(cwd)


def snakemake_stale(path: Path) -> set[str]:
    from tests.pipeline.test_workflow import parse_dry_run

    proc = _run([str(BIN / "snakemake"), "-n"], path)
    return {j.rule for j in parse_dry_run(proc.stdout + "\n" + proc.stderr) if j.rule != "all"}


def _snapshot(path: Path) -> dict[Path, tuple[bytes, os.stat_result]]:
    names = [
        "params.yaml",
        "dvc.yaml",
        "xtra/schema/params.schema.yaml",
        "xtra/recipes.yaml",
        "xtra/model/xtra.py",
        "xtra/report/figures.py",
        *(f"profiles/{p.name}" for p in (path / "profiles").glob("*.yaml")),
    ]
    return {path / n: ((path / n).read_bytes(), (path / n).stat()) for n in names}


def _restore(snapshot: dict[Path, tuple[bytes, os.stat_result]]) -> None:
    for file, (data, stat) in snapshot.items():
        file.write_bytes(data)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 13 edits x (dvc status + snakemake -n), after a dvc repro of 15 stages
def test_staleness_matrix_is_exact_and_the_same_in_both_front_ends(built):
    assert dvc_stale(built) == set() and snakemake_stale(built) == set()
    snapshot, wrong = _snapshot(built), []
    for name, edit, expected in EDITS:
        edit(built)
        got = {"dvc": dvc_stale(built), "snakemake": snakemake_stale(built)}
        _restore(snapshot)
        print(f"{name:28s} dvc {sorted(got['dvc'])}  snakemake {sorted(got['snakemake'])}")
        if got["dvc"] != expected or got["snakemake"] != expected:
            wrong.append(f"{name}: expected {sorted(expected)}, got {got}")
    assert not wrong, "\n".join(wrong)
    assert dvc_stale(built) == set() and snakemake_stale(built) == set()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_failed_probe_job_is_the_only_one_rerun(built):
    """DVC commits each stage when it succeeds, so the five finished probes stay done and cached."""
    snapshot = _snapshot(built)
    _set("probe.grad_clip", 2.0)(built)
    (built / "FAIL").write_text("probe-xtra_k1-digits\n")
    failed = _run([str(BIN / "dvc"), "repro", "--keep-going"], built, check=False)
    assert failed.returncode != 0
    assert set((built / "RAN").read_text().split()) == PROBES
    (built / "FAIL").unlink()
    (built / "RAN").unlink()
    _run([str(BIN / "dvc"), "repro"], built)
    assert (built / "RAN").read_text().split() == ["probe-xtra_k1-digits", "report"]
    (built / "RAN").unlink()
    _restore(snapshot)
    _run([str(BIN / "dvc"), "repro", "-q"], built)  # back to the state the other tests expect
    (built / "RAN").unlink(missing_ok=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scale_checkpoints_and_shards_cost_dvc_nothing(built):
    """50 step checkpoints of 20 MB beside a model, and 200 MB of shards beside a manifest:
    `dvc status` takes about as long (printed; no timing assertion), and nothing goes into the cache."""

    def timed_status() -> float:
        """The fastest of three `dvc status` runs (the machine may be shared)."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            proc = _run([str(BIN / "dvc"), "status", "-q"], built, check=False)
            assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: `check` is always changed
            times.append(time.perf_counter() - start)
        return min(times)

    cache_before, without = _size(built / ".dvc" / "cache"), timed_status()
    ckpts = built / "models" / "xtra_k2" / "checkpoints"
    ckpts.mkdir(parents=True)
    block = os.urandom(1 << 20)
    for step in range(50):
        with open(ckpts / f"step-{step * 50:06d}.ckpt", "wb") as handle:
            for _ in range(20):
                handle.write(block)
    shards = built / "data" / "prepared" / "mnist5k"
    for i in range(10):
        shutil.copyfile(ckpts / "step-000000.ckpt", shards / f"train-{i:06d}.tar")
    with_files = timed_status()
    print(f"dvc status: {without:.2f} s without, {with_files:.2f} s with 50 x 20 MB checkpoints and 200 MB of shards")
    assert dvc_stale(built) == set() and snakemake_stale(built) == set()
    _run([str(BIN / "dvc"), "repro", "-q"], built)
    assert _size(built / ".dvc" / "cache") - cache_before < 1 << 20, "checkpoints or shards went into the cache"
    shutil.rmtree(ckpts)
    for i in range(10):
        (shards / f"train-{i:06d}.tar").unlink()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_make_repro_changes_no_tracked_file(tmp_path):
    """`make repro` (with a stand-in venv: the real dvc, the fake xtra) leaves every tracked file as
    it was; the only new file git sees is dvc.lock (the record of the run, to commit or not)."""
    path = copy_with_fake_xtra(tmp_path / "repo")
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    _run([*git, "add", "-A"], path)
    _run([*git, "commit", "-qm", "copy"], path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "dvc").symlink_to(BIN / "dvc")
    (venv / "bin" / "xtra").symlink_to(path / "bin" / "xtra")
    (venv / ".installed").touch()  # newer than pyproject.toml and constraints.txt: no install
    _run(["make", "repro", f"VENV={venv}"], path)
    assert len((path / "RAN").read_text().split()) == len(
        stage_table(yaml.safe_load((path / "params.yaml").read_text()))
    )
    status = [
        line for line in _run(["git", "status", "--porcelain"], path).stdout.splitlines() if line != "?? RAN"
    ]  # RAN: the stand-in's own record of what ran
    assert status == ["?? dvc.lock"], status
    (path / "RAN").unlink()
    _run(["make", "repro", f"VENV={venv}"], path)
    assert not (path / "RAN").exists(), "a second make repro ran a stage"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_temporary_experiment_shares_the_prepared_data(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs in a copy of the repository under .dvc/tmp/exps without the git-ignored
    prepared data: the `check` stage links the repository's (xtra.pipeline.dvc_yaml.share_prepared), so
    the experiment re-prepares nothing and runs only what its -S edit makes stale."""
    path = copy_with_fake_xtra(tmp_path / "repo")
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    _run([*git, "add", "-A"], path)
    _run([*git, "commit", "-qm", "copy"], path)
    _run([str(BIN / "dvc"), "repro", "-q"], path)
    _run([*git, "add", "dvc.lock"], path)
    _run([*git, "commit", "-qm", "run"], path)
    ran = tmp_path / "RAN-temp"
    monkeypatch.setenv("XTRA_FAKE_RAN", str(ran))
    _run([str(BIN / "dvc"), "exp", "run", "--temp", "-S", "probe.benchmarks.mnist.lrs=[0.001]"], path)
    assert set(ran.read_text().split()) == {*probes("mnist"), "report"}
