"""`xtra convert-checkpoint` on state dicts fabricated in the official release's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_ARCH, run_xtra
from xtra.errors import CheckpointError
from xtra.model.checkpoint import load_encoder, load_xtra
from xtra.model.convert import PREFIX_MAP, convert_official
from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA

OURS_TO_OFFICIAL = {ours: official for official, ours in PREFIX_MAP.items()}


def official_state(model: XTRA, wrapper: str = "") -> dict[str, torch.Tensor]:
    """The model's weights renamed to the release's keys (enc.*, proj.*, predictor.*, aim_proj.*)."""
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in OURS_TO_OFFICIAL if key.startswith(p))
        state[wrapper + OURS_TO_OFFICIAL[prefix] + key[len(prefix):]] = value.clone()
    return state


@pytest.fixture()
def source_model() -> XTRA:
    torch.manual_seed(3)
    return XTRA(ArchConfig(**SMALL_ARCH, num_heads_ahead=2))


def _arch() -> dict:
    return {**SMALL_ARCH, "num_heads_ahead": 2}


def test_release_keys_cover_the_documented_names(source_model: XTRA) -> None:
    keys = set(official_state(source_model))
    for expected in ("enc.patch_embed.proj.weight", "enc.pos_embed", "enc.blocks.0.attn.qkv.weight",
                     "enc.blocks.1.mlp.fc2.bias", "enc.norm.weight", "proj.mlp.0.weight", "proj.mlp.2.weight",
                     "predictor.pos_embed", "predictor.blocks.0.norm1.weight", "predictor.norm.bias",
                     "aim_proj.0.mlp.0.weight", "aim_proj.1.mlp.2.bias"):
        assert expected in keys, expected


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_converted_weights_equal_the_source(tmp_path: Path, source_model: XTRA, layout: str) -> None:
    if layout == "lightning":
        ckpt = {"state_dict": official_state(source_model, "model."), "epoch": 799}
    else:
        ckpt = {"module": official_state(source_model), "dp_world_size": 8}
    src = tmp_path / ("xtra.ckpt" if layout == "lightning" else "mp_rank_00_model_states.pt")
    torch.save(ckpt, src)
    dst = tmp_path / "out" / "last.ckpt"
    convert_official(src, dst, _arch())
    converted = load_xtra(dst)
    for key, value in source_model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)
    encoder, _ = load_encoder(dst, _arch())
    torch.testing.assert_close(encoder.pos_embed, source_model.encoder.pos_embed)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path: Path, source_model: XTRA) -> None:
    state = official_state(source_model)
    state["enc.cls_token"] = torch.zeros(1, 1, 64)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.cls_token"):
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
    with pytest.raises(CheckpointError, match=r"missing keys: \['encoder.norm.weight'\]"):
        convert_official(tmp_path / "missing.ckpt", tmp_path / "o.ckpt", _arch())
    with pytest.raises(CheckpointError, match="shape mismatches"):
        torch.save({"state_dict": official_state(source_model)}, tmp_path / "ok.ckpt")
        convert_official(tmp_path / "ok.ckpt", tmp_path / "o.ckpt", {**_arch(), "predictor_width": 48})
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither 'state_dict'"):
        convert_official(tmp_path / "foreign.pt", tmp_path / "o.ckpt", _arch())


def test_cli_converts_with_a_preset_architecture_error(tmp_path: Path, source_model: XTRA) -> None:
    torch.save({"state_dict": official_state(source_model)}, tmp_path / "small.ckpt")
    proc = run_xtra("convert-checkpoint", str(tmp_path / "small.ckpt"), str(tmp_path / "o.ckpt"),
                    "--preset", "xtra_b16", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "does not match the architecture" in proc.stderr
    assert not (tmp_path / "o.ckpt").exists()
