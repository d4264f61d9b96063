"""`xtra convert-checkpoint` on files fabricated in the official release's layout: strict mapping, stored
hyper_parameters checked, wrapper prefixes, encoder-only files, errors in the release's vocabulary,
custom architectures from the command line, and the weights-only loader's allow-list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_ARCH, run_xtra
from xtra.errors import CheckpointError
from xtra.model.arch import ArchConfig
from xtra.model.artifact import read_model_artifact
from xtra.model.checkpoint import load_artifact_encoder
from xtra.model.convert import PREFIX_MAP, convert_official
from xtra.model.xtra import XTRA

OURS_TO_OFFICIAL = {ours: official for official, ours in PREFIX_MAP.items()}


def official_state(model: XTRA, wrapper: str = "") -> dict[str, torch.Tensor]:
    """The model's weights renamed to the release's keys (enc.*, proj.*, predictor.*, aim_proj.*)."""
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in OURS_TO_OFFICIAL if key.startswith(p))
        state[wrapper + OURS_TO_OFFICIAL[prefix] + key[len(prefix) :]] = value.clone()
    return state


@pytest.fixture()
def source_model() -> XTRA:
    torch.manual_seed(3)
    return XTRA(ArchConfig(**SMALL_ARCH, num_heads_ahead=2))


def _arch() -> dict:
    return {**SMALL_ARCH, "num_heads_ahead": 2}


def test_release_keys_cover_the_documented_names(source_model: XTRA) -> None:
    keys = set(official_state(source_model))
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


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_converted_weights_equal_the_source(tmp_path: Path, source_model: XTRA, layout: str) -> None:
    if layout == "lightning":
        ckpt = {"state_dict": official_state(source_model, "model."), "epoch": 799}
    else:
        ckpt = {"module": official_state(source_model), "dp_world_size": 8}
    src = tmp_path / ("xtra.ckpt" if layout == "lightning" else "mp_rank_00_model_states.pt")
    torch.save(ckpt, src)
    dst = tmp_path / "out" / "model.pt"
    convert_official(src, dst, _arch())
    converted = read_model_artifact(dst)
    assert converted.init == "official" and not converted.encoder_only
    for key, value in source_model.state_dict().items():
        torch.testing.assert_close(converted.state_dict[key], value, rtol=0, atol=0)
    encoder, _, _ = load_artifact_encoder(dst, _arch())
    torch.testing.assert_close(encoder.pos_embed, source_model.encoder.pos_embed)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path: Path, source_model: XTRA) -> None:
    state = official_state(source_model)
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
        torch.save({"state_dict": official_state(source_model)}, tmp_path / "ok.ckpt")
        convert_official(tmp_path / "ok.ckpt", tmp_path / "o.ckpt", {**_arch(), "predictor_width": 48})
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither 'state_dict'"):
        convert_official(tmp_path / "foreign.pt", tmp_path / "o.ckpt", _arch())


def test_cli_converts_with_a_preset_architecture_error(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": official_state(source_model)}, tmp_path / "small.ckpt")
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


def test_stored_hyper_parameters_are_checked_naming_the_key(tmp_path: Path, source_model: XTRA) -> None:
    hparams = {
        "model": {
            "enc": {"embed_dim": 64, "num_heads": 2, "depth": 2},
            "predictor": {"embed_dim": 32, "num_heads": 2, "depth": 1},
        },
        "lr": 1e-3,
        "use_bf16": True,
    }
    torch.save({"state_dict": official_state(source_model, "model."), "hyper_parameters": hparams}, tmp_path / "h.ckpt")
    report = convert_official(tmp_path / "h.ckpt", tmp_path / "ok.pt", _arch())
    assert "model.predictor.num_heads" in report["checked"] and len(report["checked"]) == 6
    # a wrong head count has the same tensor shapes: only the stored hyper_parameters can catch it
    with pytest.raises(
        CheckpointError,
        match=r"'model.predictor.num_heads' = 2 but arch.predictor_num_heads = 4 "
        r"\(set arch.predictor_num_heads=2\)",
    ):
        convert_official(tmp_path / "h.ckpt", tmp_path / "bad.pt", {**_arch(), "predictor_num_heads": 4})
    assert not (tmp_path / "bad.pt").exists()


def test_forward_module_prefix_is_stripped(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": official_state(source_model, "_forward_module.model.")}, tmp_path / "ds.ckpt")
    assert convert_official(tmp_path / "ds.ckpt", tmp_path / "m.pt", _arch())["mapped"] == len(
        source_model.state_dict()
    )


def test_an_encoder_only_file_becomes_a_probe_able_encoder(tmp_path: Path, source_model: XTRA) -> None:
    state = {k: v for k, v in official_state(source_model, "model.").items() if k.startswith("model.enc.")}
    state["model.head.weight"], state["model.head.bias"] = torch.zeros(1000, 64), torch.zeros(1000)  # the classifier
    torch.save({"state_dict": state}, tmp_path / "finetuned.ckpt")
    with pytest.raises(CheckpointError, match=r"head.bias.*--drop PREFIX"):
        convert_official(tmp_path / "finetuned.ckpt", tmp_path / "m.pt", _arch())
    report = convert_official(tmp_path / "finetuned.ckpt", tmp_path / "m.pt", _arch(), drop=["head."])
    assert report["encoder_only"] and report["dropped"] == ["head.bias", "head.weight"]
    assert read_model_artifact(tmp_path / "m.pt").encoder_only
    encoder, _, init = load_artifact_encoder(tmp_path / "m.pt", _arch())
    assert init == "official"
    torch.testing.assert_close(encoder.blocks[1].mlp.fc2.weight, source_model.encoder.blocks[1].mlp.fc2.weight)


def test_errors_name_the_release_keys_and_the_fixing_param(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": official_state(source_model)}, tmp_path / "two.ckpt")  # 2 pixel heads
    with pytest.raises(
        CheckpointError,
        match=r"in the file, not in the arch: aim_proj\.1\.mlp\.0\.bias "
        r"\(check arch.num_heads_ahead",
    ):
        convert_official(tmp_path / "two.ckpt", tmp_path / "m.pt", {**_arch(), "num_heads_ahead": 1})
    with pytest.raises(CheckpointError, match=r"enc\.blocks\.1\.\S+ \(check arch.depth"):
        convert_official(tmp_path / "two.ckpt", tmp_path / "m.pt", {**_arch(), "depth": 1})


def test_cli_custom_architecture_by_preset_and_set_or_arch_file(tmp_path: Path, source_model: XTRA, capsys) -> None:
    import yaml

    torch.save({"state_dict": official_state(source_model)}, tmp_path / "small.ckpt")
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
    torch.save({"state_dict": official_state(source_model), "callbacks": _Payload()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="weights-only loader.*allow-list.*_Payload"):
        convert_official(tmp_path / "pickled.ckpt", tmp_path / "m.pt", _arch())


def test_pretrain_stage_of_an_official_model_goes_through_the_converter(tmp_path: Path, source_model: XTRA) -> None:
    """`init: official`: `xtra pretrain M` writes model.pt by convert_official (so a wrong stored
    hyper-parameter is refused there too) and metrics.json with what was mapped."""
    import json

    from xtra.config import validate_params
    from xtra.train.pretrain import pretrain_model

    src = tmp_path / "release.ckpt"
    torch.save(
        {
            "state_dict": official_state(source_model, "model."),
            "hyper_parameters": {"predictor_num_heads": SMALL_ARCH["predictor_num_heads"]},
        },
        src,
    )
    params = validate_params(
        {
            "profile": "t",
            "paths": {
                "models": str(tmp_path / "models"),
                "prepared": str(tmp_path / "p"),
                "results": str(tmp_path / "r"),
            },
            "datasets": {"digits": {"kind": "digits"}},
            "models": {"rel": {"init": "official", "checkpoint": str(src), "arch": _arch()}},
            "probe": {"benchmarks": {"digits": {"dataset": "digits", "eval_split": "test"}}},
        },
        check_paths=False,
    )
    out = pretrain_model(params, "rel")
    converted = read_model_artifact(out / "model.pt")
    assert converted.init == "official" and converted.provenance["converted_from"] == str(src)
    for key, value in source_model.state_dict().items():
        torch.testing.assert_close(converted.state_dict[key], value, rtol=0, atol=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"] == "official" and metrics["mapped"] == len(source_model.state_dict())
