"""The release-probe profile (issue 23 item 3): profiles/release_probe.yaml probes both released XTRA
pre-training files (init: official) with paper_h14's benchmarks and probe recipe, no pre-training; it
validates, names each missing weights file, plans in both front-ends, and a reduced-size variant of it
(tiny architectures in the release's layouts, the fixture benchmarks, fabricated release files) runs
the stages DVC would run, conversion to report."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.fixtures.release_files import SMALL_SIZES, pretrain_file
from xtra.cli import main as xtra_main
from xtra.config import validate_params
from xtra.model.arch import PRESETS, ArchConfig
from xtra.model.xtra import XTRA
from xtra.yamlio import read_yaml

PROFILES = REPO / "profiles"
RELEASED = {"xtra_b16": ("paper_b16", "vit_base", "base"), "xtra_h14": ("paper_h14", "vit_huge", "huge")}


def profile(name: str) -> dict:
    return read_yaml((PROFILES / f"{name}.yaml").read_text(), name)


def test_the_profile_is_the_paper_s_probes_of_the_released_files(tmp_path: Path, capsys) -> None:
    """Both models are the release's files under their paper arch; the probe recipe and benchmarks are
    paper_h14's; no pre-training dataset; `xtra validate` names both missing files; nothing upsampled."""
    release, h14 = profile("release_probe"), profile("paper_h14")
    for name, (paper, _, _) in RELEASED.items():
        model, trained = release["models"][name], profile(paper)["models"][name]
        assert model["init"] == "official" and model["checkpoint"].startswith("/weights/")
        assert (model["arch"], model["eval_resize"]) == (trained["arch"], trained["eval_resize"])
        assert model["resources"]["gpus"] == 0 and model["resources"]["nodes"] == 1  # a conversion
    assert release["probe"] == {**h14["probe"], "models": ["xtra_b16", "xtra_h14", "pixels"]}
    assert "imagenet21k" not in release["datasets"]
    assert set(release["datasets"]) == {b["dataset"] for b in h14["probe"]["benchmarks"].values()}

    capsys.readouterr()
    assert xtra_main(["validate", "--no-paths", "--params", str(PROFILES / "release_probe.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err  # every stored size >= both models' evaluation resize
    assert xtra_main(["validate", "--params", str(PROFILES / "release_probe.yaml")]) == 2
    err = capsys.readouterr().err
    for name in RELEASED:
        assert f"models.{name}.checkpoint: path '{release['models'][name]['checkpoint']}' does not exist" in err


def _tree(dest: Path) -> Path:
    """What the two front-ends read: the workflow, profiles, schema, published numbers, params.yaml, dvc.yaml."""
    for name in ("workflow", "profiles", "xtra/schema", "xtra/report/reference"):
        shutil.copytree(REPO / name, dest / name, symlinks=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, dest / name)
    return dest


@pytest.mark.timeout(300)
def test_the_profile_plans_in_both_front_ends(tmp_path: Path) -> None:
    """`xtra profile release_probe` (weights files given by --set) writes a current dvc.yaml: a
    conversion stage per released model, a probe stage per model and benchmark, no prepare of
    ImageNet-21k; `snakemake -n` plans the same jobs, on one node and through the Slurm profile."""
    root = _tree(tmp_path)
    (root / "weights").mkdir()
    sets = []
    for name in RELEASED:
        (root / "weights" / f"{name}.ckpt").write_bytes(b"")  # an input of the plans, not read by them
        sets += ["--set", f"models.{name}.checkpoint=weights/{name}.ckpt"]
    params = root / "params.yaml"
    assert xtra_main(["profile", "release_probe", "--params", str(params), *sets]) == 0
    assert xtra_main(["dag", "--check", "--params", str(params)]) == 0
    stages = set(read_yaml((root / "dvc.yaml").read_text())["stages"])
    benchmarks = profile("paper_h14")["probe"]["benchmarks"]
    linear = [b for b, bench in benchmarks.items() if "linear" in bench["kinds"]]  # the pixel floor's
    expected = {"pretrain-xtra_b16", "pretrain-xtra_h14", "report"} | {f"probe-pixels-{b}" for b in linear}
    expected |= {f"probe-{m}-{b}" for m in RELEASED for b in benchmarks}
    assert linear == ["in1k"] and len(benchmarks) == 15
    assert expected <= stages and not any("imagenet21k" in s for s in stages)

    snakemake = str(Path(sys.executable).parent / "snakemake")
    for extra in ([], ["--profile", "workflow/profiles/slurm"]):
        proc = subprocess.run([snakemake, "-n", *extra], cwd=root, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        planned = set(re.findall(r"^rule ([\w.-]+):", proc.stdout + proc.stderr, re.M))
        assert expected - {"report"} <= planned | {"all"}, sorted(expected - planned)


# a tiny architecture in each released file's layout: the preset names stay the release's (enc_arch
# vit_base / vit_huge), their sizes are the fixture's (SMALL_SIZES, set into PRESETS by the test)
TINY = {"img_size": 32, "patch_size": 8, "block_size": 2, "proj_hidden": 64, "predictor_width": 32}
TINY |= {"predictor_num_heads": 2, "predictor_depth": 1, "head_hidden": 64, "drop_path_rate": 0.0}


@pytest.mark.timeout(300)
def test_a_reduced_release_probe_runs_to_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, one_thread
) -> None:
    """The profile at tiny sizes: each model's release file fabricated in the release's format, its
    `pretrain` stage converts it, the probe stages probe both models and the pixel floor on the fixture
    benchmarks, and the report writes its tables with both released models in them."""
    from tests.probe.test_stage import build_inputs, make_params

    fixture = make_params(tmp_path, epochs=1)
    params = copy.deepcopy(profile("release_probe"))
    params["paths"], params["datasets"] = fixture["paths"], fixture["datasets"]
    params["probe"]["benchmarks"] = {
        name: {**bench, "kinds": ["linear", "attentive"]} for name, bench in fixture["probe"]["benchmarks"].items()
    }
    params["probe"] |= {"precision": "32-true", "num_workers": 0, "augment": False}
    params["probe"]["kinds"]["attentive"] |= {"num_last_blocks": 1, "num_heads": 2}
    for kind in params["probe"]["kinds"].values():
        kind["augmentation"] = "none"
    for name, (_, enc_arch, size) in RELEASED.items():
        monkeypatch.setitem(PRESETS, size, SMALL_SIZES[size])
        model = params["models"][name]
        model["arch"] |= TINY
        model["eval_resize"] = 32
        torch.manual_seed(len(name))
        src = pretrain_file(tmp_path / "weights" / f"{name}.ckpt", XTRA(ArchConfig.from_dict(model["arch"])), enc_arch)
        model["checkpoint"] = str(src)
    params["models"]["pixels"]["arch"]["img_size"] = 32
    params["models"]["pixels"]["eval_resize"] = 32
    params = validate_params(params, "reduced release_probe")
    build_inputs(params, datasets=("set_a", "set_b"))
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(params))  # JSON is YAML

    for name in ("xtra_b16", "xtra_h14", "pixels"):
        assert xtra_main(["pretrain", name, "--params", str(path)]) == 0, name
        assert xtra_main(["probe", name, "--params", str(path), "--no-ray"]) == 0, name
    for name in RELEASED:
        provenance = torch.load(tmp_path / "models" / name / "model.pt", weights_only=True)["provenance"]
        assert provenance["written_by"] == "pretrain"
        for bench in ("bench_a", "bench_b"):
            result = json.loads((tmp_path / "results" / "probe" / name / f"{bench}-attentive.json").read_text())
            assert result["model"] == name and 0 <= result["top1"] <= 100
    assert xtra_main(["report", "--params", str(path), "--readme", ""]) == 0
    tables = "".join(p.read_text() for p in sorted((tmp_path / "results" / "tables").glob("*.md")))
    assert "xtra_b16" in tables and "xtra_h14" in tables
