"""params.yaml: bad files fail fast through the CLI naming the key; the shipped profiles are valid and
carry METHOD.md's recipes; every ablation of docs/ABLATIONS.md validates.

The bad-file table runs `xtra validate`, `xtra prepare` and `xtra probe` in-process through
`xtra.cli.main` (the console script's entry point: same parsing, same exit code) so that torch is
imported once; one test runs the real console script as a subprocess.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, demo_params
from xtra.cli import main as xtra_main
from xtra.config import load_params, validate_params
from xtra.errors import ParamsError
from xtra.pipeline.profiles import apply_overrides

PROFILES = REPO / "profiles"
OUTPUT_DIRS = ("data", "models", "results")


def profile(name: str) -> dict[str, Any]:
    return yaml.safe_load((PROFILES / f"{name}.yaml").read_text())


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets a dotted key (creating mappings on the way)."""

    def mutate(params: dict) -> None:
        *parents, last = path.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[dict], None]:
    """A mutation that renames the last key of a dotted path (a typo)."""

    def mutate(params: dict) -> None:
        *parents, last = path.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[new] = node.pop(last)

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(params: dict) -> None:
        *parents, last = path.split(".")
        node = params
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


# (id, mutation of the demo params or raw text, text the error must contain)
BAD_PARAMS: list[tuple[str, Callable[[dict], None] | str, str]] = [
    ("typo-top-level", _rename("seed", "seeed"), "['seeed']"),
    ("typo-paths", _rename("paths.models", "model"), "['model']"),
    ("typo-dataset-key", _rename("datasets.mnist5k.image_size", "imgae_size"), "['imgae_size']"),
    ("typo-arch-key", _rename("models.xtra_k2.arch.block_size", "blok_size"), "['blok_size']"),
    ("typo-train-key", _rename("models.xtra_k2.train.epochs", "epoch"), "['epoch']"),
    ("typo-probe-key", _rename("probe.kinds.attentive.num_last_blocks", "num_last_block"), "['num_last_block']"),
    ("typo-benchmark-key", _rename("probe.benchmarks.mnist.lrs", "learning_rates"), "['learning_rates']"),
    ("typo-ray-key", _set("probe.ray.adress", "auto"), "['adress']"),
    ("wrong-type-epochs", _set("models.xtra_k1.train.epochs", "three"), "models.xtra_k1.train.epochs"),
    ("wrong-type-seed", _set("seed", 1.5), "seed"),
    ("wrong-type-kinds", _set("probe.benchmarks.digits.kinds", "linear"), "probe.benchmarks.digits.kinds"),
    ("negative-image-size", _set("datasets.mnist5k.image_size", -32), "datasets.mnist5k.image_size"),
    ("negative-batch", _set("probe.benchmarks.mnist.batch_size", -1), "probe.benchmarks.mnist.batch_size"),
    ("zero-patch", _set("models.xtra_k2.arch.patch_size", 0), "models.xtra_k2.arch.patch_size"),
    ("negative-gpus", _set("models.xtra_k2.resources.gpus", -1), "models.xtra_k2.resources.gpus"),
    ("img-not-divisible", _set("models.xtra_k2.arch.img_size", 30), "models.xtra_k2.arch"),
    ("block-not-dividing-grid", _set("models.xtra_k1.arch.block_size", 3), "models.xtra_k1.arch"),
    ("too-many-heads-ahead", _set("models.xtra_k2.arch.num_heads_ahead", 16), "models.xtra_k2.arch"),
    ("unknown-kind", _set("probe.benchmarks.mnist.kinds", ["linear", "knn"]), "probe.benchmarks.mnist.kinds"),
    ("unknown-preset", _set("models.xtra_k2.arch.preset", "giant"), "models.xtra_k2.arch.preset"),
    ("missing-root", _set("datasets.cifar", {"kind": "cifar10"}), "datasets.cifar.root"),
    (
        "absent-root-path",
        _set("datasets.cifar", {"kind": "cifar10", "root": "/nonexistent/cifar10"}),
        "datasets.cifar.root",
    ),
    ("model-unknown-dataset", _set("models.xtra_k2.dataset", "imagenet1k"), "models.xtra_k2.dataset"),
    ("benchmark-unknown-dataset", _set("probe.benchmarks.digits.dataset", "svhn"), "probe.benchmarks.digits.dataset"),
    ("probe-unknown-model", _set("probe.models", ["xtra_k9"]), "probe.models"),
    ("empty-lrs", _set("probe.benchmarks.mnist.lrs", []), "probe.benchmarks.mnist.lrs"),
    ("negative-lr", _set("probe.benchmarks.mnist.lrs", [-0.1]), "probe.benchmarks.mnist.lrs"),
    ("betas-out-of-range", _set("models.xtra_k2.train.betas", [0.9, 1.5]), "models.xtra_k2.train.betas"),
    ("bad-enum-loss", _set("models.xtra_k2.arch.loss", "l2"), "models.xtra_k2.arch.loss"),
    ("bad-enum-precision", _set("models.xtra_k2.train.precision", "fp8"), "models.xtra_k2.train.precision"),
    ("bad-enum-protocol", _set("probe.protocol", "best"), "probe.protocol"),
    ("bad-enum-dataset-kind", _set("datasets.digits.kind", "mnist"), "datasets.digits.kind"),
    ("bad-enum-init", _set("models.random_k2.init", "zeros"), "models.random_k2.init"),
    ("missing-eval-split", _delete("probe.benchmarks.mnist.eval_split"), "probe.benchmarks.mnist: 'eval_split'"),
    ("bad-dataset-name", _rename("datasets.digits", "Digits"), "datasets: 'Digits'"),
    ("not-a-mapping", "- demo\n- paper\n", "expected a mapping"),
    ("not-yaml", "models: [xtra_k2\n", "not valid YAML"),
]


def _write_bad(tmp_path: Path, mutation: Callable[[dict], None] | str) -> Path:
    path = tmp_path / "bad.yaml"
    if isinstance(mutation, str):
        path.write_text(mutation)
    else:
        params = profile("demo")
        mutation(params)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.faults
@pytest.mark.parametrize("name,mutation,key", BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_bad_params_fail_fast_naming_the_key(name, mutation, key, tmp_path, monkeypatch, capsys):
    bad = _write_bad(tmp_path, mutation)
    monkeypatch.chdir(tmp_path)  # params paths are relative: any output would appear here
    for argv in (
        ["validate", "--params", str(bad)],
        ["prepare", "mnist5k", "--params", str(bad)],
        ["probe", "xtra_k2", "--params", str(bad), "--no-ray"],
    ):
        code = xtra_main(argv)  # "fast": it fails before any job starts (no output folder below)
        err = capsys.readouterr().err
        assert code == 2, f"xtra {' '.join(argv)} exited {code}: {err}"
        assert err.startswith("error: ") and key in err, f"xtra {argv[0]}: message does not name {key!r}: {err}"
        assert "Traceback" not in err
    assert not [d for d in OUTPUT_DIRS if (tmp_path / d).exists()], "a rejected params file started a job"


def test_bad_params_table_is_large_enough():
    assert len(BAD_PARAMS) >= 20 and len({case[0] for case in BAD_PARAMS}) == len(BAD_PARAMS)


@pytest.mark.faults
def test_console_script_exit_code_and_message(tmp_path):
    """The installed `xtra` entry point itself: exit code 2, one `error:` line, no traceback."""
    bad = _write_bad(tmp_path, _rename("models.xtra_k2.arch.block_size", "blok_size"))
    proc = subprocess.run(
        [sys.executable, "-m", "xtra.cli", "validate", "--params", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "blok_size" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the shipped profiles


@pytest.mark.parametrize("name", ["demo", "paper_b16", "paper_h14"])
def test_profiles_have_no_plain_yaml_alias(name):
    """`key: *anchor` makes one object of several keys: `dvc exp run -S` on one of them is undone
    when DVC writes the others back (DVC 3.67 merges its result into the loaded YAML). Merge keys
    (`<<: *anchor`) make separate mappings and are safe."""
    lines = (PROFILES / f"{name}.yaml").read_text().splitlines()
    aliases = [line for line in lines if re.search(r"(:|^\s*-)\s+\*\w+", line.split("#")[0]) and "<<:" not in line]
    assert not aliases


def test_params_yaml_is_the_demo_profile():
    assert (REPO / "params.yaml").read_text() == (PROFILES / "demo.yaml").read_text()


@pytest.mark.parametrize("name", ["demo", "paper_b16", "paper_h14"])
def test_profiles_validate(name):
    params = load_params(PROFILES / f"{name}.yaml", check_paths=(name == "demo"))
    assert params["profile"] == name
    raw = profile(name)
    # What dvc.yaml interpolates must be in the file itself (DVC does not see the schema's defaults).
    assert {"seed", "paths"} <= set(raw) and set(raw["paths"]) == {"prepared", "models", "results"}
    for model, cfg in raw["models"].items():
        assert {"dataset", "arch", "eval_resize"} <= set(cfg), f"models.{model} lacks a key dvc.yaml reads"
        assert cfg["dataset"] in raw["datasets"]


@pytest.mark.parametrize("name", ["paper_b16", "paper_h14"])
def test_paper_profiles_name_their_raw_data(name):
    """Placeholder roots: loading with the path check names the first missing one."""
    with pytest.raises(ParamsError, match=r"datasets\.\w+\.root: path '/datasets/"):
        load_params(PROFILES / f"{name}.yaml", check_paths=True)


def _global_batch(train: dict) -> int:
    return train["batch_size"] * train["devices"] * train["num_nodes"] * train["accumulate_grad_batches"]


IN1K_GRID = [0.0001, 0.0003, 0.0005, 0.001, 0.0015, 0.002, 0.004]  # the release's seven
LR_GRID = IN1K_GRID + [0.008, 0.01]  # the transfer benchmarks


def test_paper_b16_recipe():
    p = validate_params(profile("paper_b16"), check_paths=False)
    m = p["models"]["xtra_b16"]
    assert (m["dataset"], m["eval_resize"]) == ("imagenet1k", 300)
    a, t = m["arch"], m["train"]
    assert (a["preset"], a["img_size"], a["patch_size"], a["block_size"]) == ("base", 256, 16, 4)
    assert (a["proj_hidden"], a["predictor_depth"], a["predictor_width"], a["predictor_num_heads"]) == (4096, 8, 768, 6)
    assert a["head_hidden"] == 6144 and 0.1 <= a["drop_path_rate"] <= 0.2 and a["norm_pix_loss"] and a["loss"] == "mse"
    assert (t["epochs"], t["lr"], t["weight_decay"], t["betas"], t["grad_clip"]) == (800, 1e-3, 0.05, [0.9, 0.95], 1.0)
    assert (t["warmup_start_lr"], t["warmup_epochs"], t["min_lr"], t["precision"]) == (1e-4, 15, 1e-6, "bf16-mixed")
    assert _global_batch(t) == 2048 and t["strategy"] == "ddp"
    assert (m["resources"]["nodes"], m["resources"]["gpus"]) == (t["num_nodes"], t["devices"]) == (4, 8)
    bench = p["probe"]["benchmarks"]["in1k"]
    assert bench["kinds"] == ["linear", "attentive"] and bench["lrs"] == IN1K_GRID
    assert (bench["epochs"], bench["batch_size"], bench["accum_steps"], bench["warmup_epochs"]) == (100, 1024, 4, 10)
    probe = p["probe"]  # the release's recipe: betas, schedule, per-kind augmentation (B/16 linear: crop + flip)
    linear, attentive = probe["kinds"]["linear"], probe["kinds"]["attentive"]
    assert linear["weight_decays"] == [0.0] and attentive["weight_decays"] == [0.1]
    assert (probe["betas"], probe["schedule"], probe["last_group_loss"]) == ([0.9, 0.95], "release", "release")
    assert (linear["augmentation"], attentive["augmentation"]) == ("crop_flip", "randaugment") and probe["augment"]
    assert probe["models"] == ["xtra_b16", "pixels"] and p["models"]["pixels"]["init"] == "pixels"


H14_BATCH = {
    "in1k": (1024, 4),
    "inat18": (1024, 4),
    "pcam": (1024, 4),
    "dtd": (128, 1),
    "pets": (128, 1),
    "cars": (128, 1),
    "infograph": (256, 1),
}


def test_paper_h14_recipe():
    p = validate_params(profile("paper_h14"), check_paths=False)
    m = p["models"]["xtra_h14"]
    a, t = m["arch"], m["train"]
    assert (m["dataset"], m["eval_resize"], a["preset"], a["img_size"], a["patch_size"]) == (
        "imagenet21k",
        256,
        "huge",
        224,
        14,
    )
    assert (a["block_size"], a["proj_hidden"], a["predictor_width"], a["predictor_num_heads"], a["head_hidden"]) == (
        4,
        5120,
        640,
        8,
        9408,
    )
    assert (a["drop_path_rate"], t["epochs"], t["warmup_epochs"], _global_batch(t)) == (0.2, 100, 3, 2048)
    assert (m["resources"]["nodes"], m["resources"]["gpus"]) == (t["num_nodes"], t["devices"])
    benchmarks = p["probe"]["benchmarks"]
    assert list(benchmarks) == [
        "in1k",
        "inat18",
        "cifar10",
        "cifar100",
        "food101",
        "dtd",
        "pets",
        "cars",
        "iwildcam",
        "camelyon17",
        "pcam",
        "rxrx1",
        "eurosat",
        "fmow",
        "infograph",
    ]
    assert sum(len(b["kinds"]) for b in benchmarks.values()) == 16 and benchmarks["in1k"]["kinds"] == [
        "linear",
        "attentive",
    ]
    for name, bench in benchmarks.items():
        assert "attentive" in bench["kinds"] and bench["epochs"] == 100
        assert (bench["batch_size"], bench["accum_steps"]) == H14_BATCH.get(name, (512, 1)), name
        assert bench["warmup_epochs"] == (10 if name in ("in1k", "inat18") else 0), name
        grid = IN1K_GRID if name == "in1k" else LR_GRID + ([0.1] if name in ("inat18", "cars", "infograph") else [])
        assert bench["lrs"] == grid, name
    kinds = p["probe"]["kinds"]
    assert kinds["linear"]["weight_decays"] == [0.1] == kinds["attentive"]["weight_decays"]
    assert kinds["linear"]["augmentation"] == "randaugment" == kinds["attentive"]["augmentation"]
    assert p["probe"]["schedule"] == "release" and p["probe"]["betas"] == [0.9, 0.95]
    assert len(p["datasets"]) == 16 and all(d["root"].startswith("/datasets/") for d in p["datasets"].values())
    assert all(d["resources"]["gpus"] == 0 for d in p["datasets"].values())


# ---------------------------------------------------------------- docs/ABLATIONS.md

_SECTION = re.compile(r"^## .*\(profile `(\w+)`", re.M)
_OVERRIDE = re.compile(r"-S '([^']+)'")


def ablation_commands() -> list[tuple[str, str, list[str]]]:
    """(profile, command, overrides) of every `dvc exp run` line under a profile's section."""
    text = (REPO / "docs" / "ABLATIONS.md").read_text()
    heads = list(_SECTION.finditer(text))
    found = []
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = text[head.end() : nxt.start() if nxt else len(text)]
        for line in body.splitlines():
            if line.startswith("dvc exp run"):
                found.append((head.group(1), line, _OVERRIDE.findall(line)))
    return found


def test_ablations_cover_method_switches():
    commands = ablation_commands()
    assert {p for p, _, _ in commands} == {"demo", "paper_b16", "paper_h14"}
    keys = {o.split("=")[0].split(".")[-1] for _, _, overrides in commands for o in overrides}
    assert {
        "block_size",
        "num_heads_ahead",
        "predictor_depth",
        "predictor_width",
        "loss",
        "block_order",
        "img_size",
    } <= keys
    for name in ("paper_b16", "paper_h14"):
        sizes = {o.split("=")[1] for p, _, ov in commands if p == name for o in ov if ".block_size=" in o}
        assert sizes | {"4"} == {"1", "2", "4", "8"}, (name, sizes)


@pytest.mark.parametrize(
    "name,command,overrides",
    ablation_commands(),
    ids=lambda v: v if isinstance(v, str) and v.startswith("dvc") else None,
)
def test_ablation_is_valid(name, command, overrides):
    assert overrides, f"no -S override in {command!r}"
    base = profile(name)
    changed = apply_overrides(base, overrides)
    for item in overrides:  # the mappings on the way exist: a typo in a model name is no new model
        *parents, _ = item.split("=")[0].split(".")
        node: Any = base
        for part in parents:
            assert isinstance(node, dict) and part in node, f"{item}: {part!r} is not in profile {name}"
            node = node[part]
    validate_params(copy.deepcopy(changed), f"{name} + {command}", check_paths=False)


@pytest.mark.parametrize("name", ["demo", "paper_b16", "paper_h14"])
def test_ablations_are_accepted_by_dvc(name, tmp_path):
    """DVC's own `-S` parser (`dvc.utils.hydra.apply_overrides`, what `dvc exp run -S` calls) takes
    every override of the profile's section of docs/ABLATIONS.md: it refuses a key params.yaml does
    not spell out. One call with all of them (DVC checks each key; the last value of a key wins, as
    in our own parser), so each profile file is parsed and written once."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    overrides = [o for p, _, ov in ablation_commands() if p == name for o in ov]
    assert overrides
    target = tmp_path / "params.yaml"
    target.write_text((PROFILES / f"{name}.yaml").read_text())
    dvc_apply_overrides(str(target), overrides)
    assert yaml.safe_load(target.read_text()) == apply_overrides(profile(name), overrides)  # DVC wrote what we read


@pytest.mark.parametrize("name", ["demo", "paper_b16", "paper_h14"])
def test_shipped_profiles_spell_out_every_schema_key(name):
    """DVC sees only what the file says; `xtra profile --fill` writes the schema's defaults in."""
    from xtra.pipeline.fill import missing_keys

    assert missing_keys((PROFILES / f"{name}.yaml").read_text()) == []


def test_documented_ablations_are_accepted_by_dvc(tmp_path):
    """The `dvc exp run -S` lines of docs/pretraining.md, through DVC's own parser (one call, as above)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    text = (REPO / "docs" / "pretraining.md").read_text()
    commands = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("dvc exp run")]
    overrides = [o for command in commands for o in _OVERRIDE.findall(command)]
    assert commands and all(_OVERRIDE.findall(c) for c in commands)
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    dvc_apply_overrides(str(target), overrides)
    for command in commands:
        validate_params(apply_overrides(profile("demo"), _OVERRIDE.findall(command)), command, check_paths=False)


def test_validate_refuses_multi_node_outside_a_scheduler_job(tmp_path, monkeypatch, capsys):
    """The B/16 recipe has 4 nodes: on one machine Lightning would wait for 32 processes."""
    from xtra.config import SCHEDULER_ENV

    for name in SCHEDULER_ENV:
        monkeypatch.delenv(name, raising=False)
    params = apply_overrides(profile("demo"), ["models.xtra_k2.train.num_nodes=4", "models.xtra_k2.train.devices=8"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert xtra_main(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.xtra_k2.train.num_nodes is 4" in err and "32 processes" in err
    assert "snakemake --profile workflow/profiles/slurm" in err and "--set models.xtra_k2.train.num_nodes=1" in err
    assert xtra_main(["validate", "--params", str(path), "--no-paths"]) == 0  # checking the file only
    monkeypatch.setenv("SLURM_NTASKS", "32")
    assert xtra_main(["validate", "--params", str(path)]) == 0


def test_a_key_given_twice_is_an_error_naming_it(tmp_path):
    """PyYAML would keep the second silently (a text merge can leave a key twice)."""
    text = (
        (PROFILES / "demo.yaml")
        .read_text()
        .replace("    heldout_fraction: 0.2\n", "    heldout_fraction: 0.2\n    heldout_fraction: 0.3\n", 1)
    )
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=r"key 'heldout_fraction' appears twice .*lines \d+ and \d+"):
        load_params(path, check_paths=False)
    assert load_params(PROFILES / "demo.yaml", check_paths=False)["models"]["xtra_k1"]["arch"]["block_size"] == 1


# scalars that YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml, DVC) read differently
YAML_12 = "lr: 1e-3\nmin_lr: 1E-6\nflag: yes\nmode: on\nten: 010\neight: 0o10\nclock: 1:30\n"


def test_one_yaml_reading_for_the_project_and_dvc(tmp_path):
    """The project reads params as DVC does (YAML 1.2): `lr: 1e-3` is 0.001 to `xtra validate`, to
    DVC's parser, to `xtra profile --set` and to DVC's `-S`, and what either writes reads back the same."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from dvc.utils.serialize import parse_yaml

    from xtra.pipeline.profiles import parse_value
    from xtra.yamlio import dump_yaml, read_yaml

    expected = {"lr": 0.001, "min_lr": 1e-6, "flag": "yes", "mode": "on", "ten": 10, "eight": 8, "clock": "1:30"}
    assert read_yaml(YAML_12) == parse_yaml(YAML_12, "dvc") == expected
    assert yaml.safe_load(YAML_12) != expected  # what the project read before: '1e-3', True, 8, 90
    assert read_yaml(dump_yaml(expected)) == expected and read_yaml(dump_yaml({"s": "1e-3"})) == {"s": "1e-3"}
    assert [parse_value(v) for v in ("1e-3", "yes", "[1e-3, 0.1]")] == [0.001, "yes", [0.001, 0.1]]

    text = (PROFILES / "demo.yaml").read_text()
    assert "      lr: 0.001\n" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("      lr: 0.001\n", "      lr: 1e-3\n", 1))
    ours = load_params(path, check_paths=False)
    theirs = parse_yaml(path.read_text(), str(path))
    assert ours["models"]["xtra_k2"]["train"]["lr"] == theirs["models"]["xtra_k2"]["train"]["lr"] == 0.001
    dvc_apply_overrides(str(path), ["models.xtra_k2.train.warmup_start_lr=1e-5"])  # what `dvc exp run -S` writes
    ours = load_params(path, check_paths=False)
    assert ours["models"]["xtra_k2"]["train"]["warmup_start_lr"] == 1e-5
    assert ours == validate_params(apply_overrides(profile("demo"), ["models.xtra_k2.train.warmup_start_lr=1e-5"]))


@pytest.mark.parametrize(
    "old,value,new",
    [
        ("models.xtra_k2.arch.heads", 3, "models.xtra_k2.arch.num_heads"),
        ("models.xtra_k1.arch.predictor_heads", 2, "models.xtra_k1.arch.predictor_num_heads"),
        ("probe.attn_heads", 4, "probe.kinds.attentive.num_heads"),
        ("probe.num_last_blocks", 4, "probe.kinds.attentive.num_last_blocks"),
        ("probe.linear_weight_decays", [0.0], "probe.kinds.linear.weight_decays"),
        ("probe.attentive_weight_decays", [0.1], "probe.kinds.attentive.weight_decays"),
        ("probe.augmentation", {"linear": "none"}, "probe.kinds.<kind>.augmentation"),
    ],
)
def test_a_renamed_key_is_refused_naming_the_new_one(old: str, value, new: str):
    params = apply_overrides(demo_params(), [f"{old}={json.dumps(value)}"])
    with pytest.raises(ParamsError, match=re.escape(f"{old}: renamed to {new}")):
        validate_params(params, check_paths=False)
