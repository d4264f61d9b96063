"""Online probes (xtra.train.online): a set without labels refuses to start unless another labelled set is
named, the labelled set's batches resume by position, the params are checked, and the run records them.
Exact resume with online heads on, and the model's weights untouched by them: tests/train/test_resume.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.fixtures.base import write_image
from tests.fixtures.pretrain import run_pretrain, tiny_params
from xtra.config import validate_params
from xtra.errors import ParamsError

ONLINE = {"kinds": ["linear"], "lrs": [1e-3, 1e-2]}


@pytest.fixture(scope="module")
def one_class(small, tmp_path_factory) -> tuple[Path, Path]:
    """(its raw root, the prepared root) of `mono`: 12 training and 4 held-out images, all of one class."""
    from xtra.data.prepare import prepare_dataset

    tmp, prepared = small
    raw = tmp_path_factory.mktemp("mono")
    for split, count in (("train", 12), ("val", 4)):
        for n in range(count):
            write_image(raw / split / "only" / f"{split}{n}.png", size=(16, 16), seed=50 + n)
    section = {"kind": "custom", "root": str(raw), "image_size": 16, "size_check": "warn", "num_workers": 1}
    params = tiny_params(tmp, prepared)
    params["datasets"]["mono"] = section
    prepare_dataset("mono", validate_params(params, check_paths=False)["datasets"]["mono"], prepared)
    return raw, prepared


def _on_mono(tmp: Path, prepared: Path, raw: Path, online: dict) -> dict:
    params = tiny_params(tmp, prepared, online=online, val_every_n_steps=3)
    params["datasets"]["mono"] = {"kind": "custom", "root": str(raw), "image_size": 16, "size_check": "warn"}
    params["models"]["m"]["dataset"] = "mono"
    return params


def test_a_set_without_labels_refuses_unless_a_labelled_set_is_named(small, one_class, tmp_path: Path) -> None:
    tmp, prepared = small
    raw, _ = one_class
    refused = run_pretrain(tmp_path, _on_mono(tmp, prepared, raw, ONLINE), prepared)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "models.m.online_probe" in refused.stderr and "dataset 'mono'" not in refused.stderr
    assert "the pre-training set 'mono' has 1 class(es)" in refused.stderr
    assert not (tmp_path / "models" / "m" / "model.pt").exists()

    named = tmp_path / "named"
    named.mkdir()
    proc = run_pretrain(named, _on_mono(tmp, prepared, raw, {**ONLINE, "dataset": "small"}), prepared)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = named / "models" / "m"
    plan = json.loads((out / "run.json").read_text())["online_probe"]
    assert plan["features"].startswith("dataset small") and plan["eval_split"] == "val"
    with (out / "online.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["step"]), r["lr"]) for r in rows] == [(3, "0.001"), (3, "0.01"), (6, "0.001"), (6, "0.01")]
    assert {float(r["top1"]) for r in rows} <= {0.0, 25.0, 50.0, 75.0, 100.0}  # the 4 held-out images of `small`


def test_labelled_batches_resume_by_position_and_split_the_ranks(small, monkeypatch) -> None:
    from xtra.train import online

    _, prepared = small

    def draws(rank: int, world: int, skip: int = 0, count: int = 9) -> list[list[int]]:
        monkeypatch.setattr(online, "world", lambda: (rank, world))
        batches = online.LabelledBatches(prepared / "small", 16, 16, 4 // world, seed=3, num_workers=0)
        if skip:
            batches.load_state_dict({"drawn": skip})
        return [batches.next_batch()[0].flatten(1)[:, :8].sum(1).tolist() for _ in range(count - skip)]

    whole = draws(0, 1)
    assert draws(0, 1, skip=4) == whole[4:]  # 24 images, 6 batches a pass: the resume crosses a pass
    assert whole[:6] != whole[6:9] + whole[:3]  # the second pass is another order
    ranks = draws(0, 2, count=6) + draws(1, 2, count=6)
    one_pass = sorted(round(v, 4) for batch in whole[:6] for v in batch)
    assert sorted(round(v, 4) for batch in ranks for v in batch) == one_pass  # the ranks share a pass, disjoint


def test_online_params_are_checked_naming_the_key(small) -> None:
    tmp, prepared = small
    for online, key in (
        ({"kinds": ["nearest"]}, "models.m.online_probe.kinds: unknown probe kind 'nearest'"),
        ({"kinds": ["linear"], "dataset": "nowhere"}, "models.m.online_probe.dataset: 'nowhere'"),
    ):
        with pytest.raises(ParamsError, match=key):
            validate_params(tiny_params(tmp, prepared, online=online), check_paths=False)
    params = tiny_params(tmp, prepared, online={"kinds": ["linear"]})
    params["models"]["m"]["init"] = "random"
    with pytest.raises(ParamsError, match="models.m.online_probe.kinds: online probes train during pre-training"):
        validate_params(params, check_paths=False)


def test_online_heads_are_part_of_the_run_folder_and_of_the_stage_keys_not_of_the_model(small) -> None:
    """The heads live in the run's checkpoints (another folder), change metrics.json (the stage's keys), and
    never a weight (the resume tests compare both models bit for bit): the model's trajectory is the same."""
    from xtra.identity import stage_keys
    from xtra.train import identity

    tmp, prepared = small
    off = validate_params(tiny_params(tmp, prepared), check_paths=False)
    on = validate_params(tiny_params(tmp, prepared, online=ONLINE), check_paths=False)
    trajectories = {str(identity.trajectory(p, "m", 1, "data")) for p in (off, on)}
    assert len(trajectories) == 1
    heads = [{**ONLINE, "data": "labels"}, {**ONLINE, "lrs": [1e-3], "data": "labels"}, {**ONLINE, "data": "other"}]
    folders = [identity.run_id(identity.run_values(identity.trajectory(off, "m", 1, "data"), h)) for h in heads]
    plain = identity.run_values(identity.trajectory(off, "m", 1, "data"), None)
    assert len({*folders, identity.run_id(plain)}) == 4 and plain == identity.trajectory(off, "m", 1, "data")
    assert "models.m.online_probe" in stage_keys(on, "pretrain", model="m")
    configured = [f"probe.kinds.{k}" for k in ONLINE["kinds"] if k in on["probe"]["kinds"]]
    assert configured and set(configured) <= set(stage_keys(on, "pretrain", model="m"))


def test_online_logs_are_outputs_of_their_pretrain_stage_and_inputs_of_the_report(small) -> None:
    from xtra.pipeline.dag import stage_table

    tmp, prepared = small
    for online, expected in (({"kinds": []}, []), (ONLINE, ["models/m/online.csv"])):
        params = validate_params(tiny_params(tmp, prepared, online=online), check_paths=False)
        params["paths"]["models"] = "models"
        stages = {s.name: s for s in stage_table(params)}
        assert [o for o in stages["pretrain-m"].outs if o.endswith("online.csv")] == expected
        assert [d for d in stages["report"].data if d.endswith("online.csv")] == expected


def test_online_flops_are_a_small_share_unless_an_extra_forward_is_needed() -> None:
    from xtra.model.arch import MODEL_PRESETS, ArchConfig
    from xtra.model.flops import encoder_forward_flops, online_probe_flops_per_image, train_flops_per_image

    cfg = ArchConfig(**MODEL_PRESETS["xtra_h14"])
    kinds = {"linear": {}, "attentive": {"num_last_blocks": 6}}
    reuse = online_probe_flops_per_image(cfg, kinds, 1000, 1, extra_forward=False)
    extra = online_probe_flops_per_image(cfg, kinds, 1000, 1, extra_forward=True)
    assert reuse / train_flops_per_image(cfg) < 1e-3
    assert extra - reuse == pytest.approx(encoder_forward_flops(cfg))
    assert online_probe_flops_per_image(cfg, kinds, 1000, 4, False) > 3 * reuse  # per head
    assert torch.isfinite(torch.tensor(extra))
