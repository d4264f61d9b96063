"""Golden numerics: what each stage computes, pinned, so that a change of numerics cannot go unnoticed.

Three end-to-end measurements on tiny inputs, one thread, CPU:
- prepare: the sha256 of every shard and index of the small class-folder set and of the demo's
  digits (the bytes every later stage reads);
- pretrain: a tiny XTRA (drop path and pseudo-random block orders on, stream loader) trained for
  12 steps: every logged step's loss, lr and gradient norm, and the sha256 of every final tensor;
- probe: that model's linear and attentive banks (2 lrs each, RandAugment on, 2 epochs): every
  head's top-1, every epoch's loss of every head, and the sha256 of every final head tensor.

The recorded values live in tests/golden/numerics.json. A refactor leaves every one of them equal, bit
for bit. `XTRA_RECORD_GOLDEN=1 pytest tests/test_golden.py` records them anew: only for a deliberate
change of numerics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.pretrain import prepare_small, run_pretrain, tiny_params

GOLDEN = Path(__file__).resolve().parent / "golden" / "numerics.json"
RECORD = os.environ.get("XTRA_RECORD_GOLDEN") == "1"


def tensor_digests(state: dict[str, torch.Tensor]) -> list[str]:
    """The sorted sha256 of every tensor's bytes: independent of the tensors' names (a rename is no change)."""
    return sorted(hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for t in state.values())


def check(stage: str, values: dict) -> None:
    """Compare `values` with the recorded golden values of `stage` (or record them, with XTRA_RECORD_GOLDEN=1)."""
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORD:
        recorded[stage] = values
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert stage in recorded, f"no golden values of {stage} in {GOLDEN}: record them (XTRA_RECORD_GOLDEN=1)"
    for key, want in recorded[stage].items():
        assert values.get(key) == want, f"golden numerics of {stage} moved at {key!r}"
    assert set(values) == set(recorded[stage]), f"golden values of {stage}: other keys than recorded"


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
    check("prepare", values)


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
    check("pretrain", values)


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
    check("probe", values)
