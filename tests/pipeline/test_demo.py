"""The whole demo through DVC, from a copy of the repository: outputs well formed, then a no-op re-run.

Marked `demo` (not in the default run): CI runs it once after the default suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from xtra.pipeline.dvc_yaml import CHECK_STAGE

pytestmark = [pytest.mark.demo, pytest.mark.timeout(1800)]  # the whole demo: ~10 minutes on 2 cores


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
        elif src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst / name)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "demo"],
    ):
        subprocess.run(["git", *args], cwd=dst, check=True)


def _dvc(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(Path(bin_dir) / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _top1(results: Path, model: str, bench: str, kind: str, grid: int) -> float:
    payload = json.loads((results / "probe" / model / f"{bench}-{kind}.json").read_text())
    assert payload["protocol"] == "paper" and len(payload["heads"]) == grid  # one head per lr of the sweep
    assert 0 <= payload["top1"] <= 100
    return payload["top1"]


def test_demo_pipeline_runs_and_a_second_run_is_a_noop(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    start = time.time()
    first = _dvc("repro", cwd=work, timeout=3000)
    took = time.time() - start
    print(f"demo dvc repro: {took:.0f} s")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    results = work / "results"
    benchmarks = yaml.safe_load((work / "params.yaml").read_text())["probe"]["benchmarks"]
    for bench, cfg in benchmarks.items():
        kinds = {
            "xtra_k2": ("linear", "attentive"),
            "xtra_k1": ("linear", "attentive"),
            "random_k2": ("linear", "attentive"),
            "pixels": ("linear",),
        }  # the floor: linear only
        for model, model_kinds in kinds.items():
            for kind in model_kinds:
                _top1(results, model, bench, kind, len(cfg["lrs"]))
    table = pd.read_csv(results / "tables" / "top1.csv")
    assert {"xtra_k2", "xtra_k1", "random_k2", "pixels"} <= set(table["model"].dropna())
    floor = table[(table["row"] == "floor") & (table["model"] == "pixels")]
    for bench in benchmarks:  # the pixel floor has a number on every demo benchmark
        assert floor[bench].notna().any(), bench
    assert (results / "tables" / "top1.md").read_text().count("|") > 20
    assert (results / "tables" / "top1.tex").read_text().startswith("\\begin{tabular}") or "\\toprule" in (
        results / "tables" / "top1.tex"
    ).read_text()
    for figure in ("top1_bars", "paper_comparison", "lr_sweep", "pretrain_loss", "images_seen", "reconstruction"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 1000
    json.loads((results / "metrics.json").read_text())

    # what pre-training buys: the block-causal model beats the random-init control on held-out MNIST
    grid = len(benchmarks["mnist"]["lrs"])
    trained = _top1(results, "xtra_k2", "mnist", "linear", grid)
    control = _top1(results, "random_k2", "mnist", "linear", grid)
    print(f"mnist linear top-1: xtra_k2 {trained:.1f} vs random_k2 {control:.1f}")
    assert trained > control

    start = time.time()
    second = _dvc("repro", cwd=work, timeout=300)
    again = time.time() - start
    print(f"second dvc repro: {again:.1f} s")
    assert second.returncode == 0, second.stderr[-2000:]
    ran = re.findall(r"Running stage '([^']+)'", second.stdout)
    assert ran == [CHECK_STAGE], second.stdout  # only the params check, which runs every time
    # the pipeline writes only untracked, git-ignored outputs: no tracked file changed (README included)
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=work, capture_output=True, text=True, check=True
    ).stdout
    assert changed == "", changed
