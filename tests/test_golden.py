"""Golden numerics, keyed by recipe version: what each stage computes, pinned, so that a change of
numerics cannot go unnoticed, nor be made without a new recipe version (`xtra/recipes.yaml`).

Four measurements on tiny inputs, one thread, CPU:
- prepare: the sha256 of every shard and index of the small class-folder set and of the demo's
  digits (the bytes every later stage reads);
- pretrain: one step of a fixed tiny XTRA on a fixed batch (the loss and the gradient norm, to the
  bit), and the same model trained for 12 steps (drop path and pseudo-random block orders on, stream
  loader): every logged step's loss, lr and gradient norm, and the sha256 of every final tensor;
- probe: that model's linear and attentive banks (2 lrs each, RandAugment on, 2 epochs): every
  head's top-1, every epoch's loss of every head, and the sha256 of every final head tensor. The
  measurement is named by the pretrain version of the model it probes (`sweep of a pretrain-<v>
  model`): a new pretrain version moves these numbers without any change of the probe stage.

tests/golden/numerics.json holds them as {stage: {recipe version: {measurement: values}}}. A refactor
leaves every value of the current versions equal, bit for bit. A change of numerics fails here, saying
to bump the stage's version in xtra/recipes.yaml (a new version is a new run and a new probe job:
nothing of the old one is reused); `XTRA_RECORD_GOLDEN=1 pytest tests/test_golden.py` then records
the new version's values. It never overwrites a version's recorded values: the old versions stay,
the record of what each one computed. `test_a_numerics_change_without_a_version_bump_fails` shows the
check catching a deliberately perturbed loss.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.pretrain import TINY_ARCH, prepare_small, run_pretrain, tiny_params
from xtra.identity import RECIPES_FILE, recipe_version

GOLDEN = Path(__file__).resolve().parent / "golden" / "numerics.json"
RECORD = os.environ.get("XTRA_RECORD_GOLDEN") == "1"


def tensor_digests(state: dict[str, torch.Tensor]) -> list[str]:
    """The sorted sha256 of every tensor's bytes: independent of the tensors' names (a rename is no change)."""
    return sorted(hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for t in state.values())


def check(stage: str, measurement: str, values: dict) -> None:
    """Compare `values` with the golden values of `stage`'s current recipe version (or record them, with
    XTRA_RECORD_GOLDEN=1, when that version has none)."""
    version = str(recipe_version(stage))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    recorded = golden.get(stage, {}).get(version, {}).get(measurement)
    bump = (
        f"a change of numerics needs a new recipe version: bump `{stage}` in {RECIPES_FILE.name} "
        f"(xtra/recipes.yaml), then record the new version's values (XTRA_RECORD_GOLDEN=1 pytest "
        f"tests/test_golden.py); a refactor must leave every value equal"
    )
    if RECORD and recorded is None:
        golden.setdefault(stage, {}).setdefault(version, {})[measurement] = values
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert recorded is not None, (
        f"no golden values of {stage} {measurement} for recipe version {version} in {GOLDEN}: "
        f"record them (XTRA_RECORD_GOLDEN=1 pytest tests/test_golden.py)"
    )
    for key, want in recorded.items():
        assert values.get(key) == want, (
            f"golden numerics of {stage} ({measurement}) moved at {key!r} under recipe version {version}: {bump}"
        )
    assert set(values) == set(recorded), f"golden values of {stage} {measurement}: other keys than recorded"


def one_step() -> dict:
    """The loss and gradient norm of a fixed tiny XTRA (TINY_ARCH, seed 0) on a fixed batch, bit for bit."""
    from xtra.model.arch import ArchConfig
    from xtra.model.xtra import XTRA, release_ordered_parameters

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = XTRA(ArchConfig.from_dict({**TINY_ARCH, "drop_path_rate": 0.0}))
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        loss = model.loss(images, step=0)
        loss.backward()
        grads = [p.grad for p in release_ordered_parameters(model) if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
    finally:
        torch.set_num_threads(before)
    return {"loss": float(loss).hex(), "grad_norm": float(norm).hex()}


def test_one_step_is_the_golden_step() -> None:
    check("pretrain", "step", one_step())


@pytest.mark.skipif(RECORD, reason="recording golden values")
def test_a_numerics_change_without_a_version_bump_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss scaled by 1 + 2^-20 (a change no eye would see) fails the check, naming the version to bump."""
    from xtra.model import xtra as xtra_module

    original = xtra_module.XTRA.loss
    monkeypatch.setattr(
        xtra_module.XTRA, "loss", lambda self, images, step=0: original(self, images, step) * (1 + 2**-20)
    )
    with pytest.raises(
        AssertionError, match=r"moved at '(grad_norm|loss)' under recipe version \d+: .*bump `pretrain` in recipes.yaml"
    ):
        check("pretrain", "step", one_step())


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The small set prepared and the tiny model pre-trained once for the module: (tmp, run folder, params)."""
    tmp = tmp_path_factory.mktemp("golden")
    prepared = prepare_small(tmp)
    run_dir = tmp / "run"
    run_dir.mkdir()
    params = tiny_params(tmp, prepared)
    proc = run_pretrain(run_dir, params, prepared)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, run_dir, params


def test_prepared_shards_are_the_golden_bytes(golden_run, prepared_demo) -> None:
    tmp, _, _ = golden_run
    values = {}
    for root in (tmp / "prepared" / "small", prepared_demo / "digits"):
        manifest = json.loads((root / "manifest.json").read_text())
        for _split, entry in sorted(manifest["splits"].items()):
            for shard in entry["shards"]:
                values[f"{root.name}/{shard['file']}"] = shard["sha256"]
                values[f"{root.name}/{shard['index']}"] = shard["index_sha256"]
    check("prepare", "shards", values)


def test_pretraining_is_the_golden_trajectory(golden_run) -> None:
    from xtra.model.artifact import read_model_artifact

    _, run_dir, _ = golden_run
    with (run_dir / "models" / "m" / "log.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    values = {
        "steps": [int(r["step"]) for r in rows],
        "loss": [r["loss"] for r in rows],
        "lr": [r["lr"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "weights": tensor_digests(read_model_artifact(run_dir / "models" / "m" / "model.pt").state_dict),
    }
    check("pretrain", "trajectory", values)


def test_probing_is_the_golden_sweep(golden_run) -> None:
    from xtra.probe.cli import probe_model

    tmp, run_dir, params = golden_run
    params = json.loads(json.dumps(params))
    params["paths"] = {
        "prepared": str(tmp / "prepared"),
        "models": str(run_dir / "models"),
        "results": str(run_dir / "results"),
    }
    params["probe"]["benchmarks"] = {
        "small": {
            "dataset": "small",
            "train_split": "train",
            "eval_split": "val",
            "epochs": 2,
            "batch_size": 8,
            "lrs": [0.001, 0.03],
        }
    }
    params["probe"].update(augment=True, num_workers=0)
    params["probe"]["kinds"]["attentive"].update(num_last_blocks=2, num_heads=2)
    from xtra.config import validate_params

    params = validate_params(params)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert probe_model(params, "m", ["small"], None, use_ray=False) == 0
    finally:
        torch.set_num_threads(before)
    values: dict = {}
    for kind in ("linear", "attentive"):
        result = json.loads((run_dir / "results" / "probe" / "m" / f"small-{kind}.json").read_text())
        values[f"{kind}/top1"] = [h["top1"] for h in result["heads"]]
    state_file = next((run_dir / "results" / "probe-state" / "m" / "small").glob("*.pt"))
    state = torch.load(state_file, weights_only=True)
    for kind, trainer in sorted(state["trainers"].items()):
        values[f"{kind}/history"] = trainer["history"]
        values[f"{kind}/heads"] = tensor_digests(trainer["bank"])
    check("probe", f"sweep of a pretrain-{recipe_version('pretrain')} model", values)
