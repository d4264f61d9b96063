"""Your own dataset and benchmark (issue 24, item 5): docs/own-data.md followed as written, on a fixture
tree; a minimal entry completed with the active profile's values (by `xtra profile --fill` and by every
command alike); splits checked against the dataset's kind; a dataset stored smaller than a model reads
it warned about."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.fixtures.base import write_image
from xtra.cli import main as xtra_main
from xtra.config import load_params, profile_defaults, validate_params
from xtra.errors import ParamsError
from xtra.pipeline.fill import fill_text
from xtra.yamlio import read_yaml

DOC = REPO / "docs" / "own-data.md"
BLOCK = re.compile(r"<!-- recipe: (\S+) -->\n```\w+\n(.*?)```", re.S)
PROFILES = REPO / "profiles"


def recipe() -> dict[str, str]:
    return dict(BLOCK.findall(DOC.read_text()))


def add_section(params_text: str, section: str) -> str:
    """`section` (a YAML block of nested headers and one-line entries) typed into `params_text` as a user
    would: each entry line right below the same header line of the file, the file's layout kept."""
    lines = params_text.splitlines(keepends=True)
    headers: list[tuple[int, str]] = []  # (indent, header line) of the block's open mappings
    for line in section.splitlines():
        indent = len(line) - len(line.lstrip())
        headers = [(i, h) for i, h in headers if i < indent]
        if line.rstrip().endswith(":"):
            headers.append((indent, line.rstrip()))
            continue
        at = 0
        for _, header in headers:  # the header lines of the path, in order, below one another
            at = next(n for n in range(at, len(lines)) if lines[n].rstrip() == header) + 1
        lines.insert(at, line + "\n")
    return "".join(lines)


def class_tree(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("daisy", "rose", "tulip")) -> None:
    """`root/<split>/<class>/<n>.png`: 40x40 noise images, `splits[split]` a class."""
    for split, count in splits.items():
        for c, name in enumerate(classes):
            for n in range(count):
                write_image(root / split / name / f"{n}.png", (40, 40), seed=100 * c + n)


def test_the_recipe_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, one_thread) -> None:
    """The page's tree, its params section typed into the demo's params.yaml, its commands: `xtra profile
    --fill` completes the entries with the demo's values and rewrites dvc.yaml (new stages), `xtra
    validate` passes; then the commands of the new stages that `dvc repro` would run for the random-init
    control (its pre-training is an initialisation, seconds), prepare and probe, write the results."""
    blocks = recipe()
    assert list(blocks) == ["params.yaml", "commands"]
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(PROFILES, tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    section = read_yaml(blocks["params.yaml"])
    root = Path(section["datasets"]["flowers"]["root"])
    class_tree(root, {"train": 8, "val": 4})
    Path("params.yaml").write_text(add_section(Path("params.yaml").read_text(), blocks["params.yaml"]))

    commands = [line.split() for line in blocks["commands"].splitlines() if line.strip()]
    assert commands[-1] == ["dvc", "repro"]
    capsys.readouterr()
    for command in commands[:-1]:
        assert command[0] == "xtra" and xtra_main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "params.yaml: 20 key(s) added (datasets.flowers.image_size = 32, " in out, out

    params = read_yaml(Path("params.yaml").read_text())
    assert read_yaml(Path("profiles/demo.yaml").read_text()) == read_yaml((PROFILES / "demo.yaml").read_text())
    bench, demo = params["probe"]["benchmarks"]["flowers"], params["probe"]["benchmarks"]["mnist"]
    assert {k: bench[k] for k in ("epochs", "batch_size", "lrs", "kinds")} == {
        k: demo[k] for k in ("epochs", "batch_size", "lrs", "kinds")
    }  # the demo's 10 epochs, batch 256, eight rates; not the schema's 100, 512, nine
    assert params["datasets"]["flowers"]["image_size"] == 32 and params["datasets"]["flowers"]["root"] == str(root)
    stages = read_yaml(Path("dvc.yaml").read_text())["stages"]
    assert {"prepare-flowers", "report"} | {f"probe-{m}-flowers" for m in params["models"]} <= set(stages)
    assert xtra_main(["dag", "--check"]) == 0  # what dvc.yaml's first stage runs

    for stage in ("prepare-flowers", "pretrain-random_k2", "probe-random_k2-flowers"):
        command = stages[stage]["cmd"].split()
        assert command[0] == "xtra" and xtra_main(command[1:]) == 0, stage
    for kind in bench["kinds"]:
        result = json.loads(Path(f"results/probe/random_k2/flowers-{kind}.json").read_text())
        assert (result["epochs"], result["batch_size"], len(result["heads"])) == (10, 256, 8)
        assert (result["num_train"], result["num_eval"], result["num_classes"]) == (24, 12, 3)
        assert 0 <= result["top1"] <= 100


def _with_section(profile: str, section: str) -> str:
    return add_section((PROFILES / f"{profile}.yaml").read_text(), section)


def test_a_minimal_entry_takes_the_values_most_of_its_profile_gives():
    """In paper_h14 a new benchmark gets that profile's usual recipe (not the first benchmark's, in1k with
    accumulation and warm-up, nor the schema's); a model's `train` is completed key by key and its arch
    taken whole; a key naming an entry's own data never comes from another entry; a section with no other
    entry falls back to the schema. `xtra profile --fill` writes exactly what the commands read."""
    text = _with_section(
        "paper_h14",
        "datasets:\n  birds: {kind: custom, root: /data/birds}\n"
        "models:\n  xtra_h14_k1: {init: pretrain, dataset: imagenet21k, train: {epochs: 5}}\n"
        "probe:\n  benchmarks:\n    birds: {dataset: birds, eval_split: val}\n",
    )
    defaults = profile_defaults(read_yaml(text))
    bench = {k.rsplit(".", 1)[1]: v for k, v in defaults.items() if k.startswith("probe.benchmarks.birds.")}
    assert bench == {
        "train_split": "train",
        "kinds": ["attentive"],
        "epochs": 100,
        "warmup_epochs": 0,
        "batch_size": 512,
        "accum_steps": 1,
        "devices": 1,
        "lrs": [0.0001, 0.0003, 0.0005, 0.001, 0.0015, 0.002, 0.004, 0.008, 0.01],
    }
    assert defaults["datasets.birds.image_size"] == 288 and "datasets.birds.root" not in defaults
    assert not any(
        k.startswith("datasets.birds.") and k.split(".")[-1] in ("heldout_fraction", "layout") for k in defaults
    )
    assert "models.xtra_h14_k1.train.epochs" not in defaults  # given
    assert defaults["models.xtra_h14_k1.train.batch_size"] == 32  # a tie of two models: the first one's
    assert defaults["models.xtra_h14_k1.arch"]["preset"] == "huge" and "models.xtra_h14_k1.arch.width" not in defaults
    assert "models.xtra_h14_k1.init" not in defaults and "models.xtra_h14_k1.checkpoint" not in defaults

    filled, added = fill_text(text, "paper_h14 + birds")
    assert set(defaults) <= {k for k in added}
    loaded = validate_params(read_yaml(text), check_paths=False)
    assert validate_params(read_yaml(filled), check_paths=False) == loaded  # fill writes what the commands use
    assert loaded["probe"]["benchmarks"]["birds"]["epochs"] == 100 and loaded["datasets"]["birds"]["layout"] == "auto"

    alone = read_yaml((PROFILES / "paper_b16.yaml").read_text())
    alone["probe"]["benchmarks"] = {"in1k": {"dataset": "imagenet1k", "eval_split": "val"}}
    assert validate_params(alone, check_paths=False)["probe"]["benchmarks"]["in1k"]["epochs"] == 100  # the schema's


def test_a_split_the_dataset_does_not_have_is_refused_naming_the_key(tmp_path: Path, capsys):
    """`eval_split: test` for mnist5k (train / val) fails `xtra validate` naming the key and the splits;
    a class-folder tree has `test` only when it has the folder, which only a check of the paths sees."""
    demo = read_yaml((PROFILES / "demo.yaml").read_text())
    bad = json.loads(json.dumps(demo))
    bad["probe"]["benchmarks"]["mnist"]["eval_split"] = "test"
    with pytest.raises(
        ParamsError,
        match=r"probe.benchmarks.mnist.eval_split: dataset 'mnist5k' \(kind mnist5k\) "
        r"has no split 'test'; its splits: train, val",
    ):
        validate_params(bad, check_paths=False)
    bad = json.loads(json.dumps(demo))
    bad["models"]["xtra_k2"]["train"]["val_split"] = "test"  # val_every_n_steps 50: the validation reads it
    with pytest.raises(ParamsError, match=r"models.xtra_k2.train.val_split: dataset 'mnist5k'"):
        validate_params(bad, check_paths=False)

    class_tree(tmp_path / "own", {"train": 1, "val": 1})
    params = json.loads(json.dumps(demo))
    params["datasets"]["own"] = {"kind": "custom", "root": str(tmp_path / "own")}
    params["probe"]["benchmarks"]["own"] = {"dataset": "own", "eval_split": "test"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    capsys.readouterr()
    assert xtra_main(["validate", "--params", str(path)]) == 2
    assert (
        "probe.benchmarks.own.eval_split: dataset 'own' (kind custom) has no split 'test'; its splits: train, val"
        in (capsys.readouterr().err)
    )
    assert xtra_main(["validate", "--params", str(path), "--no-paths"]) == 0  # the params file alone: cannot tell
    class_tree(tmp_path / "own", {"test": 1})
    assert xtra_main(["validate", "--params", str(path)]) == 0


def test_a_dataset_stored_smaller_than_a_model_reads_it_is_warned(tmp_path: Path, capsys):
    """digits prepared at 16 px for the demo's 32 px models: `xtra validate` and dvc.yaml's check stage
    warn, naming the dataset's image_size and the model's keys; the shipped profiles warn about nothing."""
    text = (REPO / "params.yaml").read_text()
    assert text.count("    image_size: 32\n") == 2
    path = tmp_path / "params.yaml"
    path.write_text(
        text.replace("    image_size: 32\n", "    image_size: 16\n").replace(
            "    image_size: 16\n", "    image_size: 32\n", 1
        )
    )
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    for command in (["validate"], ["dag", "--check"]):
        capsys.readouterr()
        assert xtra_main([*command, "--params", str(path)]) == 0
        err = capsys.readouterr().err
        assert "datasets.digits.image_size is 16, but model xtra_k2 reads it at 32 px" in err, err
        assert "datasets.mnist5k" not in err and "upsampled" in err
    for name in ("demo", "paper_b16", "paper_h14"):
        capsys.readouterr()
        assert xtra_main(["validate", "--no-paths", "--params", str(PROFILES / f"{name}.yaml")]) == 0
        assert "warning" not in capsys.readouterr().err, name
    assert load_params(path, check_paths=False)["datasets"]["digits"]["image_size"] == 16
