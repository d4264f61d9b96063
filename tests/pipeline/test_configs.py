"""The typed stage configs and the schema agree: every field is a schema key and every key a field,
defaults and enums are the schema's (its one home), every stage builds its config from each shipped
profile, and a checkpoint's hyper_parameters stay plain data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from xtra.config import schema_section, section_defaults, validate_params
from xtra.data.config import PrepareConfig
from xtra.model.arch import MODEL_PRESETS, PRESETS, ArchConfig
from xtra.probe.config import probe_config
from xtra.report.config import ReportConfig
from xtra.train.config import OnlineProbeConfig, PretrainConfig, TrainConfig

PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _keys(section: str) -> set[str]:
    return set(schema_section(section)["properties"])


def test_each_typed_config_has_a_field_per_schema_key():
    assert _fields(TrainConfig) == _keys("train")
    assert _fields(OnlineProbeConfig) - {"prepared", "options"} == _keys("online_probe")
    assert _fields(ArchConfig) == _keys("arch")
    assert _fields(PrepareConfig) - {"name", "out_root"} == _keys("dataset")
    assert _fields(ReportConfig) >= _keys("report")


def test_arch_defaults_and_enums_are_the_schema_s():
    props = schema_section("arch")["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(ArchConfig)}
    assert defaults == section_defaults("arch")
    assert sorted(PRESETS) == sorted(props["preset"]["enum"])
    for key in ("loss", "block_order", "attn_impl"):
        with pytest.raises(Exception, match=f"arch.{key}"):
            ArchConfig(**{key: "nonsense"}).resolved()


def test_sweep_defaults_are_the_schema_s():
    """A SweepConfig built without params (tests, the sweep bench) trains with the schema's recipe."""
    from xtra.probe.config import SweepConfig, kind_settings

    probe, bench = section_defaults("probe"), section_defaults("benchmark")
    top = {"seed": schema_section("seed")["default"]}
    want = {k: probe[k] for k in ("grad_clip", "min_lr", "warmup_start_factor", "precision", "schedule")}
    want |= {"last_group_loss": probe["last_group_loss"], "betas": tuple(probe["betas"])}
    want |= {k: bench[k] for k in ("warmup_epochs", "accum_steps")} | top
    defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig) if f.name in want}
    assert defaults == want
    attentive = SweepConfig(kind="attentive", settings=((1e-3, 0.0),), epochs=1)
    assert attentive.options == {"num_last_blocks": 6, "num_heads": 16}  # the schema's probe.kinds.attentive
    assert kind_settings("attentive")["weight_decays"] == [0.1] and kind_settings("linear")["weight_decays"] == [0.0]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_stage_builds_its_config_from_a_shipped_profile(profile: Path):
    params = validate_params(yaml.safe_load(profile.read_text()), str(profile), check_paths=False)
    for name in params["datasets"]:
        cfg = PrepareConfig.from_params(params, name)
        assert cfg.section() == params["datasets"][name]
    for name in params["models"]:
        cfg = PretrainConfig.from_params(params, name)
        assert cfg.train.as_dict() == params["models"][name]["train"]
        for bench in params["probe"]["benchmarks"]:
            assert probe_config(params, name, bench).benchmark == bench
    report = ReportConfig.from_params(params)
    assert list(report.models) == list(params["models"]) and report.dpi == params["report"]["dpi"]


@pytest.mark.parametrize("profile,model", [("paper_b16", "xtra_b16"), ("paper_h14", "xtra_h14")])
def test_the_paper_profiles_are_the_paper_presets(profile: str, model: str):
    """MODEL_PRESETS (the bench and the converter's --preset) and the profiles describe the same model."""
    params = validate_params(yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text()), check_paths=False)
    shipped = ArchConfig.from_dict(params["models"][model]["arch"])
    preset = ArchConfig(**MODEL_PRESETS[model]).resolved()
    keys = {f.name for f in dataclasses.fields(ArchConfig)} - {"drop_path_rate", "num_block_orders", "attn_impl"}
    assert {k: getattr(shipped, k) for k in keys} == {k: getattr(preset, k) for k in keys}


def test_checkpoint_hyper_parameters_are_plain_data():
    """PretrainModule saves its arch, recipe and run as plain dicts, never a pickled dataclass."""
    from xtra.train.module import PretrainModule

    params = validate_params(yaml.safe_load((REPO / "params.yaml").read_text()), check_paths=False)
    cfg = PretrainConfig.from_params(params, "xtra_k2")
    module = PretrainModule(cfg.arch, cfg.train, steps_per_epoch=10, run_id="r", seed=0)
    hparams = dict(module.hparams)
    assert json.loads(json.dumps(hparams)) == hparams  # JSON round-trips: nothing but plain data
    assert hparams["train"] == params["models"]["xtra_k2"]["train"] and hparams["run_id"] == "r"
