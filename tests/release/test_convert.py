"""`xtra convert-checkpoint` on files in the public XTRA release's format (tests/fixtures/release_files.py):
the release's flat hyper-parameters checked under its own names (each wrong encoder or predictor
setting refused naming the key), whole Lightning files, fine-tuned (classifier) files in the B/16 and
H/14 layouts converted under their presets and probed, the release's keys in every error, wrapper
prefixes, custom architectures from the command line, and the weights-only loader's allow-list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_ARCH, run_xtra
from tests.fixtures.release_files import (
    BASE_CONFIG_INHERITED,
    SMALL_SIZES,
    ReleaseTree,
    finetuned_file,
    pretrain_file,
    pretrain_hparams,
)
from xtra.errors import CheckpointError
from xtra.model.arch import MODEL_PRESETS, PRESETS, ArchConfig
from xtra.model.artifact import read_model_artifact
from xtra.model.checkpoint import load_artifact_encoder
from xtra.model.xtra import XTRA, build_arch_encoder
from xtra.release.convert import RELEASE_FIXED, RELEASE_HPARAMS, convert_official

pytestmark = pytest.mark.usefixtures("one_thread")

# a pre-training run the release could have made: vit_tiny (192 wide, 12 deep, 3 heads) on 32-px images
RELEASE_ARCH = {
    "preset": "tiny",
    "img_size": 32,
    "patch_size": 4,
    "block_size": 2,
    "proj_hidden": 256,
    "predictor_width": 64,
    "predictor_num_heads": 2,
    "predictor_depth": 1,
    "head_hidden": 128,
    "num_heads_ahead": 2,
}


def release_state(model: XTRA, wrapper: str = "") -> dict[str, torch.Tensor]:
    """The model's weights under the release's keys, in the release's order."""
    return {wrapper + k: v.clone() for k, v in ReleaseTree(model).state_dict().items()}


@pytest.fixture(scope="module")
def release_model() -> XTRA:
    torch.manual_seed(5)
    return XTRA(ArchConfig.from_dict(RELEASE_ARCH))


@pytest.fixture(scope="module")
def release_ckpt(release_model: XTRA, tmp_path_factory) -> Path:
    return pretrain_file(tmp_path_factory.mktemp("release") / "last.ckpt", release_model, "vit_tiny")


@pytest.fixture()
def source_model() -> XTRA:
    torch.manual_seed(3)
    return XTRA(ArchConfig(**SMALL_ARCH, num_heads_ahead=2))


def _arch() -> dict:
    return {**SMALL_ARCH, "num_heads_ahead": 2}


def test_release_keys_cover_the_documented_names(source_model: XTRA) -> None:
    keys = list(release_state(source_model))
    for expected in (
        "enc.patch_embed.proj.weight",
        "enc.pos_embed",
        "enc.blocks.0.attn.qkv.weight",
        "enc.blocks.1.mlp.fc2.bias",
        "enc.norm.weight",
        "proj.mlp.0.weight",
        "proj.mlp.2.weight",
        "predictor.pos_embed",
        "predictor.blocks.0.norm1.weight",
        "predictor.norm.bias",
        "aim_proj.0.mlp.0.weight",
        "aim_proj.1.mlp.2.bias",
    ):
        assert expected in keys, expected
    assert [k.split(".")[0] for k in keys] == sorted(
        (k.split(".")[0] for k in keys), key=["enc", "proj", "predictor", "aim_proj"].index
    )


@pytest.mark.parametrize(
    ("preset", "encoder", "whole"), [("xtra_b16", 85_843_200, 300_053_248), ("xtra_h14", 630_762_240, 865_018_240)]
)
def test_the_paper_presets_have_the_release_s_parameter_counts(preset: str, encoder: int, whole: int) -> None:
    """RELEASE-FORMAT.md's counts of the released models (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = XTRA(ArchConfig.from_dict(MODEL_PRESETS[preset]))
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder
    assert sum(p.numel() for p in model.parameters()) == whole


def test_a_release_pretraining_file_converts_with_its_arch(
    tmp_path: Path, release_model: XTRA, release_ckpt: Path
) -> None:
    """The whole Lightning file (AdamW and scheduler state present) converts; every architecture
    hyper-parameter it stores is checked, under the release's names."""
    raw = torch.load(release_ckpt, weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks", "hparams_name"} <= set(raw)
    assert len(raw["hyper_parameters"]) >= 85 and raw["hyper_parameters"]["enc_img_size"] == [32]
    report = convert_official(release_ckpt, tmp_path / "model.pt", RELEASE_ARCH)
    assert report["written_by"] == "pretrain" and not report["encoder_only"] and report["ignored"] == []
    unset_flags = {"aim_l1_loss", "aim_pseudo_random"}  # the release writes them only when set
    assert set(report["checked"]) == {"enc_arch", *RELEASE_HPARAMS, *RELEASE_FIXED} - unset_flags
    converted = read_model_artifact(tmp_path / "model.pt")
    assert converted.init == "official" and converted.provenance["written_by"] == "pretrain"
    assert ArchConfig.from_dict(converted.arch) == ArchConfig.from_dict(RELEASE_ARCH)
    for key, value in release_model.state_dict().items():
        assert torch.equal(converted.state_dict[key], value), key


# (arch key, a wrong value, the release key the error must name)
WRONG_SETTINGS = [
    ("num_heads", 6, "enc_arch"),
    ("width", 96, "enc_arch"),
    ("depth", 6, "enc_arch"),
    ("img_size", 48, "enc_img_size"),
    ("patch_size", 8, "enc_patch_size"),
    ("block_size", 4, "enc_block_size"),
    ("proj_hidden", 512, "proj_hidden_dim"),
    ("predictor_width", 32, "proj_out_dim"),
    ("predictor_num_heads", 4, "predictor_num_heads"),
    ("predictor_depth", 2, "predictor_depth"),
    ("num_heads_ahead", 1, "aim_num_tokens"),
    ("head_hidden", 256, "aim_proj_hidden_dim"),
    ("norm_pix_loss", False, "aim_norm_pix_loss"),
]


@pytest.mark.parametrize(("key", "value", "release"), WRONG_SETTINGS, ids=[w[0] for w in WRONG_SETTINGS])
def test_each_wrong_setting_is_refused_naming_the_release_key(
    tmp_path: Path, release_ckpt: Path, key: str, value, release: str
) -> None:
    """A head count has no shape: only the stored hyper-parameters can catch it (and the others are
    named by the key the file stores, before any shape is compared)."""
    arch = {**RELEASE_ARCH, key: value}
    with pytest.raises(
        CheckpointError, match=rf"'{release}' = .* but .*(arch\.{key}|{key} {value}).*set arch\."
    ) as err:
        convert_official(release_ckpt, tmp_path / "bad.pt", arch)
    if release == "enc_arch":
        assert "set arch.preset=tiny" in str(err.value)
    assert not (tmp_path / "bad.pt").exists()


def test_loss_and_order_flags_are_checked(tmp_path: Path, release_model: XTRA) -> None:
    hparams = {**pretrain_hparams(release_model.cfg, "vit_tiny"), "aim_l1_loss": True, "aim_pseudo_random": True}
    src = pretrain_file(tmp_path / "l1.ckpt", release_model, "vit_tiny", hparams=hparams)
    with pytest.raises(
        CheckpointError,
        match=r"'aim_l1_loss' = True but arch.loss = 'mse' \(set arch.loss=l1\).*"
        r"'aim_pseudo_random' = True but arch.block_order = 'raster' \(set arch.block_order=pseudo_random\)",
    ):
        convert_official(src, tmp_path / "m.pt", RELEASE_ARCH)
    report = convert_official(src, tmp_path / "m.pt", {**RELEASE_ARCH, "loss": "l1", "block_order": "pseudo_random"})
    assert {"aim_l1_loss", "aim_pseudo_random"} <= set(report["checked"])
    hparams["enc_is_block_causal"] = False
    src = pretrain_file(tmp_path / "bidir.ckpt", release_model, "vit_tiny", hparams=hparams)
    with pytest.raises(
        CheckpointError, match="'enc_is_block_causal' = False: this project's model implements only True"
    ):
        convert_official(src, tmp_path / "m.pt", RELEASE_ARCH)


def test_hyper_parameters_that_are_not_the_release_s_are_refused(tmp_path: Path, source_model: XTRA) -> None:
    nested = {"model": {"enc": {"num_heads": 2}}, "lr": 1e-3}  # not the release's flat config
    torch.save({"state_dict": release_state(source_model), "hyper_parameters": nested}, tmp_path / "n.ckpt")
    with pytest.raises(CheckpointError, match=r"hyper_parameters has no 'enc_arch': not a file of the XTRA release"):
        convert_official(tmp_path / "n.ckpt", tmp_path / "m.pt", _arch())
    hparams = pretrain_hparams(ArchConfig.from_dict(RELEASE_ARCH), "vit_tiny")
    hparams["enc_img_size"] = 32  # a plain int: the release writes a list of one
    torch.save({"state_dict": release_state(source_model), "hyper_parameters": hparams}, tmp_path / "i.ckpt")
    with pytest.raises(CheckpointError, match=r"'enc_img_size' = 32: expected a list of one int"):
        convert_official(tmp_path / "i.ckpt", tmp_path / "m.pt", RELEASE_ARCH)


@pytest.mark.parametrize(("preset", "enc_arch"), [("xtra_b16", "vit_base"), ("xtra_h14", "vit_huge")])
def test_finetuned_files_convert_under_their_preset_and_are_probed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str, enc_arch: str
) -> None:
    """A fine-tuned file (module 'classifier') in the B/16 layout (no enc_patch_size: 16 applies) and the
    H/14 layout, at tiny widths: its inherited predictor settings (6 heads, depth 8) are ignored, not
    refused, under `--preset`; `classifier.*` is dropped by name; the encoder-only model file is loaded
    by the probe job under the profile's arch (`init: official`, the same preset), linear and attentive."""
    from tests.probe.test_stage import build_inputs, make_params
    from xtra.config import validate_params
    from xtra.probe.cli import probe_model
    from xtra.train.pretrain import pretrain_model

    size = "base" if enc_arch == "vit_base" else "huge"
    monkeypatch.setitem(PRESETS, size, SMALL_SIZES[size])
    arch = dict(MODEL_PRESETS[preset])
    cfg = ArchConfig.from_dict(arch)
    assert BASE_CONFIG_INHERITED["predictor_num_heads"] != cfg.predictor_num_heads or preset == "xtra_b16"
    torch.manual_seed(1)
    encoder = build_arch_encoder(cfg)
    src = finetuned_file(tmp_path / "ft.ckpt", encoder, cfg, enc_arch, store_patch_size=preset != "xtra_b16")
    stored = torch.load(src, weights_only=True)
    assert ("enc_patch_size" in stored["hyper_parameters"]) == (preset == "xtra_h14")
    assert any(k.startswith("classifier.") for k in stored["state_dict"]) and stored["optimizer_states"]

    report = convert_official(src, tmp_path / "cli" / "model.pt", arch)
    assert report["encoder_only"] and report["written_by"] == "classifier"
    assert report["dropped"] and all(k.startswith("classifier.") for k in report["dropped"])
    assert {"predictor_num_heads", "predictor_depth", "proj_hidden_dim", "aim_proj_hidden_dim"} <= set(
        report["ignored"]
    )
    assert {"enc_arch", "enc_img_size", "enc_patch_size", "enc_block_size"} <= set(report["checked"])
    with pytest.raises(
        CheckpointError,
        match=r"'enc_patch_size' = 16 \(absent: the release's default\)"
        if preset == "xtra_b16"
        else r"'enc_patch_size' = 14",
    ):
        convert_official(src, tmp_path / "bad.pt", {**arch, "patch_size": 8, "img_size": 128})

    params = make_params(tmp_path, epochs=1)
    params["probe"]["benchmarks"].pop("bench_a")
    params["models"]["ft"] = {"init": "official", "checkpoint": str(src), "arch": arch, "eval_resize": cfg.img_size}
    params = validate_params(params, "test params")
    build_inputs(params, datasets=("set_b",))
    out = pretrain_model(params, "ft")
    converted = read_model_artifact(out / "model.pt")
    assert converted.encoder_only and converted.provenance["written_by"] == "classifier"
    loaded, _, init = load_artifact_encoder(out / "model.pt", arch)
    assert init == "official"
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert probe_model(params, "ft", ["bench_b"], use_ray=False) == 0
    for kind in ("linear", "attentive"):
        result = json.loads((tmp_path / "results" / "probe" / "ft" / f"bench_b-{kind}.json").read_text())
        assert result["model"] == "ft" and 0 <= result["top1"] <= 100


def test_init_official_takes_the_drop_list(tmp_path: Path, release_model: XTRA, release_ckpt: Path) -> None:
    """`drop_prefixes` of a model entry is the CLI's `--drop`: keys that are no weight of the model."""
    from xtra.config import validate_params
    from xtra.train.pretrain import pretrain_model

    raw = torch.load(release_ckpt, weights_only=True)
    raw["state_dict"]["ema.enc.pos_embed"] = torch.zeros(1)
    torch.save(raw, tmp_path / "ema.ckpt")
    model = {"init": "official", "checkpoint": str(tmp_path / "ema.ckpt"), "arch": RELEASE_ARCH}
    params = {
        "profile": "t",
        "paths": {k: str(tmp_path / k) for k in ("models", "prepared", "results")},
        "datasets": {"digits": {"kind": "digits"}},
        "models": {"rel": model, "rel_drop": {**model, "drop_prefixes": ["ema."]}},
        "probe": {"benchmarks": {"digits": {"dataset": "digits", "eval_split": "test"}}},
    }
    params = validate_params(params, check_paths=False)
    with pytest.raises(CheckpointError, match=r"neither mapped nor listed as dropped: \['ema.enc.pos_embed'\]"):
        pretrain_model(params, "rel")
    out = pretrain_model(params, "rel_drop")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dropped"] == ["ema.enc.pos_embed"] and metrics["mapped"] == len(release_model.state_dict())


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_converted_weights_equal_the_source(tmp_path: Path, source_model: XTRA, layout: str) -> None:
    if layout == "lightning":
        ckpt = {"state_dict": release_state(source_model, "model."), "epoch": 799}
    else:
        ckpt = {"module": release_state(source_model), "dp_world_size": 8}
    src = tmp_path / ("xtra.ckpt" if layout == "lightning" else "mp_rank_00_model_states.pt")
    torch.save(ckpt, src)
    dst = tmp_path / "out" / "model.pt"
    report = convert_official(src, dst, _arch())
    assert report["checked"] == []  # no hyper_parameters: nothing could be checked (and the output says so)
    converted = read_model_artifact(dst)
    assert converted.init == "official" and not converted.encoder_only
    for key, value in source_model.state_dict().items():
        torch.testing.assert_close(converted.state_dict[key], value, rtol=0, atol=0)
    encoder, _, _ = load_artifact_encoder(dst, _arch())
    torch.testing.assert_close(encoder.pos_embed, source_model.encoder.pos_embed)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path: Path, source_model: XTRA) -> None:
    state = release_state(source_model)
    state["enc.cls_token"] = torch.zeros(1, 1, 64)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="in the file, not in the arch: enc.cls_token"):
        convert_official(tmp_path / "extra.ckpt", tmp_path / "o.ckpt", _arch())
    state.pop("enc.cls_token")
    state["optimizer_junk.step"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="neither mapped nor listed as dropped.*optimizer_junk.step"):
        convert_official(tmp_path / "junk.ckpt", tmp_path / "o.ckpt", _arch())
    report = convert_official(tmp_path / "junk.ckpt", tmp_path / "o.ckpt", _arch(), drop=["optimizer_junk."])
    assert report["dropped"] == ["optimizer_junk.step"]
    state.pop("optimizer_junk.step")
    state.pop("enc.norm.weight")
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing in the file: enc.norm.weight \(check arch.width\)"):
        convert_official(tmp_path / "missing.ckpt", tmp_path / "o.ckpt", _arch())
    with pytest.raises(CheckpointError, match=r"shape mismatch: predictor\.\S+ file \(.*check arch.predictor"):
        torch.save({"state_dict": release_state(source_model)}, tmp_path / "ok.ckpt")
        convert_official(tmp_path / "ok.ckpt", tmp_path / "o.ckpt", {**_arch(), "predictor_width": 48})
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither 'state_dict'"):
        convert_official(tmp_path / "foreign.pt", tmp_path / "o.ckpt", _arch())


def test_cli_converts_with_a_preset_architecture_error(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": release_state(source_model)}, tmp_path / "small.ckpt")
    proc = run_xtra(
        "convert-checkpoint",
        str(tmp_path / "small.ckpt"),
        str(tmp_path / "o.ckpt"),
        "--preset",
        "xtra_b16",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "does not match the architecture" in proc.stderr
    assert not (tmp_path / "o.ckpt").exists()


def test_forward_module_prefix_is_stripped(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": release_state(source_model, "_forward_module.model.")}, tmp_path / "ds.ckpt")
    assert convert_official(tmp_path / "ds.ckpt", tmp_path / "m.pt", _arch())["mapped"] == len(
        source_model.state_dict()
    )


def test_an_encoder_only_file_without_hyper_parameters_becomes_a_probe_able_encoder(
    tmp_path: Path, source_model: XTRA
) -> None:
    state = {k: v for k, v in release_state(source_model, "model.").items() if k.startswith("model.enc.")}
    state["model.classifier.linear.weight"] = torch.zeros(1000, 64)  # no `module` hyper-parameter: named by hand
    torch.save({"state_dict": state}, tmp_path / "finetuned.ckpt")
    with pytest.raises(CheckpointError, match=r"classifier.linear.weight.*--drop PREFIX"):
        convert_official(tmp_path / "finetuned.ckpt", tmp_path / "m.pt", _arch())
    report = convert_official(tmp_path / "finetuned.ckpt", tmp_path / "m.pt", _arch(), drop=["classifier."])
    assert report["encoder_only"] and report["dropped"] == ["classifier.linear.weight"]
    encoder, _, init = load_artifact_encoder(tmp_path / "m.pt", _arch())
    assert init == "official"
    torch.testing.assert_close(encoder.blocks[1].mlp.fc2.weight, source_model.encoder.blocks[1].mlp.fc2.weight)


def test_errors_name_the_release_keys_and_the_fixing_param(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": release_state(source_model)}, tmp_path / "two.ckpt")  # 2 pixel heads
    with pytest.raises(
        CheckpointError,
        match=r"in the file, not in the arch: aim_proj\.1\.mlp\.0\.bias \(check arch.num_heads_ahead",
    ):
        convert_official(tmp_path / "two.ckpt", tmp_path / "m.pt", {**_arch(), "num_heads_ahead": 1})
    with pytest.raises(CheckpointError, match=r"enc\.blocks\.1\.\S+ \(check arch.depth"):
        convert_official(tmp_path / "two.ckpt", tmp_path / "m.pt", {**_arch(), "depth": 1})


def test_cli_custom_architecture_by_preset_and_set_or_arch_file(tmp_path: Path, source_model: XTRA, capsys) -> None:
    import yaml

    torch.save({"state_dict": release_state(source_model)}, tmp_path / "small.ckpt")
    sets = [f"arch.{k}={v}" for k, v in _arch().items() if k != "preset"]
    args = [a for item in sets for a in ("--set", item)]
    from xtra.cli import main  # in process: the subprocess CLI is covered by the test above

    src = str(tmp_path / "small.ckpt")
    assert main(["convert-checkpoint", src, str(tmp_path / "a.pt"), "--preset", "tiny", *args]) == 0
    assert read_model_artifact(tmp_path / "a.pt").arch["width"] == 64
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump({"arch": _arch()}))
    assert main(["convert-checkpoint", src, str(tmp_path / "b.pt"), "--arch-file", str(tmp_path / "arch.yaml")]) == 0
    assert main(["convert-checkpoint", src, str(tmp_path / "c.pt"), "--preset", "tiny", "--set", "arch.widht=64"]) == 2
    assert "widht" in capsys.readouterr().err


class _Payload:
    """An object a weights-only loader must not unpickle."""


def test_files_are_loaded_weights_only(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": release_state(source_model), "callbacks": _Payload()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="weights-only loader.*allow-list.*_Payload"):
        convert_official(tmp_path / "pickled.ckpt", tmp_path / "m.pt", _arch())
