"""The comparison backbones (xtra.release.backbones), built by timm at random init, nothing downloaded:
the full-size models' shapes (on the meta device), a reduced MAE-H/14 from a weights file in MAE's
layout probed end to end (linear and attentive) through `init: backbone`, timm's safetensors files,
AIM-0.6B's own layout renamed and checked against AIM's computation, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xtra.errors import CheckpointError, ParamsError
from xtra.model.checkpoint import load_artifact_encoder
from xtra.release.backbones import AIM_KEYS, BACKBONES, BackboneEncoder, build_backbone, read_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")

MAE_H14_REDUCED = {"depth": 2, "img_size": 28}  # MAE-H/14's width and heads, 2 of its 32 blocks, a 2x2 patch grid


@pytest.mark.parametrize(
    ("name", "tokens", "width", "probed_blocks", "millions"),
    [("mae_b16", 196, 768, 12, 86), ("mae_h14", 256, 1280, 32, 631), ("aim_600m", 256, 1536, 20, 681)],
)
def test_full_size_backbones_have_the_published_shapes(name, tokens, width, probed_blocks, millions) -> None:
    """Built on the meta device (no memory, no init): parameters and the probes' feature shapes."""
    with torch.device("meta"):
        encoder = BackboneEncoder(build_backbone(BACKBONES[name]), BACKBONES[name])
        outs = encoder.forward_features(torch.zeros(2, 3, 224, 224), blocks=[-6, -1])
    assert round(sum(p.numel() for p in encoder.model.parameters()) / 1e6) == millions
    assert [tuple(o.shape) for o in outs] == [(2, tokens, width)] * 2
    assert len(encoder.blocks) == probed_blocks and encoder.width == width and encoder.grid**2 == tokens
    assert "bidirectional" in encoder.feature_rule() and "patch tokens" in encoder.feature_rule()


def test_schema_names_every_backbone() -> None:
    from xtra.config import load_schema

    assert load_schema()["$defs"]["model"]["properties"]["backbone"]["properties"]["name"]["enum"] == list(BACKBONES)


def _mae_weights(path: Path, args: dict) -> torch.nn.Module:
    """A random-init MAE-H/14 variant saved as MAE's files are: {"model": ...}, with a decoder to drop."""
    torch.manual_seed(7)
    model = build_backbone(BACKBONES["mae_h14"], args)
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 512)
    state["decoder_embed.weight"] = torch.zeros(512, model.embed_dim)
    torch.save({"model": state, "epoch": 1599}, path)
    return model


def test_mae_backbone_is_probed_linear_and_attentive(tmp_path: Path) -> None:
    """`init: backbone` writes model.pt from the local weights file; the probe job loads it through the
    encoder interface: patch tokens (class token dropped) of the blocks asked, before the final norm."""
    from tests.probe.test_stage import build_inputs, make_params
    from xtra.config import validate_params
    from xtra.probe.cli import probe_model
    from xtra.train.pretrain import pretrain_model

    source = _mae_weights(tmp_path / "mae_pretrain_vit_huge.pth", MAE_H14_REDUCED)
    params = make_params(tmp_path, epochs=1)
    params["probe"]["benchmarks"].pop("bench_a")
    params["models"]["mae"] = {
        "init": "backbone",
        "backbone": {"name": "mae_h14", "args": MAE_H14_REDUCED},
        "checkpoint": str(tmp_path / "mae_pretrain_vit_huge.pth"),
        "eval_resize": 32,
        "arch": {"img_size": 28, "patch_size": 14, "block_size": 1},
    }
    params = validate_params(params, "test params")
    build_inputs(params, datasets=("set_b",))
    pretrain_model(params, "mae")
    path = tmp_path / "models" / "mae" / "model.pt"
    encoder, _, init = load_artifact_encoder(path, params["models"]["mae"]["arch"])
    assert init == "backbone" and isinstance(encoder, BackboneEncoder) and not encoder.training

    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        x = source.patch_embed(images)  # (B, 4, 1280)
        x = torch.cat([source.cls_token.expand(3, -1, -1), x], dim=1) + source.pos_embed
        first = source.blocks[0](x)
        second = source.blocks[1](first)
        got = encoder.forward_features(images, blocks=[-1, 0])
    assert torch.equal(got[0], second[:, 1:]) and torch.equal(got[1], first[:, 1:])  # the order asked

    assert probe_model(params, "mae", ["bench_b"], use_ray=False) == 0
    for kind in ("linear", "attentive"):
        result = json.loads((tmp_path / "results" / "probe" / "mae" / f"bench_b-{kind}.json").read_text())
        assert result["model"] == "mae" and 0 <= result["top1"] <= 100 and result["num_eval"] == 20


def test_timm_safetensors_files_are_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    args = {"depth": 1, "img_size": 32}
    torch.manual_seed(2)
    source = build_backbone(BACKBONES["mae_b16"], args)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    target = build_backbone(BACKBONES["mae_b16"], args)
    read_backbone_weights(tmp_path / "model.safetensors", BACKBONES["mae_b16"], target)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def _aim_name(timm_key: str) -> str:
    """timm's key in AIM's own names (the inverse of AIM_KEYS), as AIM's backbone file holds them."""
    for aim, timm in AIM_KEYS:
        if timm_key.startswith(timm):
            key = aim + timm_key[len(timm) :]
            return key.replace(".norm1.", ".norm_1.").replace(".norm2.", ".norm_2.")
    raise AssertionError(timm_key)


def _aim_features(weights: dict[str, torch.Tensor], images: torch.Tensor, blocks: int, heads: int) -> list:
    """AIM's computation at probing time, from its own names: patchify, LayerNorm, + the fixed sine-cosine
    embedding ([column part, row part], built as AIM does with an "xy" meshgrid), pre-norm bidirectional
    blocks without biases; each block's output."""
    w = weights
    x = F.conv2d(images, w["preprocessor.patchifier.proj.weight"], w["preprocessor.patchifier.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)  # (B, N, d)
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), w["preprocessor.patchifier.norm.weight"], w["preprocessor.patchifier.norm.bias"], 1e-6)
    g = images.shape[-1] // 14
    gx, gy = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="xy")
    omega = 1.0 / 10000 ** (torch.arange(d // 4).float() / (d / 4))

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    x = x + torch.cat([one_d(gx), one_d(gy)], dim=1)
    outs = []
    for i in range(blocks):
        p = f"trunk.blocks.{i}."
        h = F.layer_norm(x, (d,), w[p + "norm_1.weight"], w[p + "norm_1.bias"], 1e-6)
        q, k, v = (h @ w[p + "attn.qkv.weight"].T).reshape(*h.shape[:2], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
        x = x + attn @ w[p + "attn.proj.weight"].T
        h = F.layer_norm(x, (d,), w[p + "norm_2.weight"], w[p + "norm_2.bias"], 1e-6)
        x = x + F.gelu(h @ w[p + "mlp.fc1.weight"].T) @ w[p + "mlp.fc2.weight"].T
        outs.append(x)
    return outs


def test_aim_backbone_file_is_renamed_and_computes_as_aim(tmp_path: Path) -> None:
    """A reduced AIM-0.6B (6 blocks, the last 4 cut by its feature rule) from a file in AIM's layout."""
    args = {"depth": 6, "embed_dim": 64, "num_heads": 4, "img_size": 28}
    torch.manual_seed(3)
    source = build_backbone(BACKBONES["aim_600m"], args)
    aim_file = {_aim_name(k): v for k, v in source.state_dict().items() if k != "pos_embed"}  # AIM computes it
    assert not any(k.endswith(".bias") and ".attn." in k for k in aim_file)  # AIM-0.6B has no projection biases
    torch.save(aim_file, tmp_path / "aim_600m_2bimgs_attnprobe_backbone.pth")
    model = build_backbone(BACKBONES["aim_600m"], args)
    read_backbone_weights(tmp_path / "aim_600m_2bimgs_attnprobe_backbone.pth", BACKBONES["aim_600m"], model)
    encoder = BackboneEncoder(model, BACKBONES["aim_600m"]).eval()
    assert len(encoder.blocks) == 2 and "cut after block 2 of 6" in encoder.feature_rule()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = _aim_features(aim_file, images, blocks=2, heads=4)
        got = encoder.forward_features(images, blocks=[-2, -1])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ParamsError, match=r"out of range for aim_600m's 2 blocks"):
        encoder.forward_features(images, blocks=[-3])


def test_backbone_errors_name_the_file_and_key(tmp_path: Path) -> None:
    from tests.probe.test_stage import make_params
    from xtra.config import validate_params
    from xtra.train.pretrain import pretrain_model

    model = build_backbone(BACKBONES["mae_b16"], {"depth": 1, "img_size": 32})
    state = {**model.state_dict(), "head.weight": torch.zeros(10, 768)}
    torch.save(state, tmp_path / "finetuned.pth")
    with pytest.raises(CheckpointError, match=r"finetuned.pth \(mae_b16\) does not match.*head.weight"):
        read_backbone_weights(tmp_path / "finetuned.pth", BACKBONES["mae_b16"], model)
    with pytest.raises(CheckpointError, match="never downloaded"):
        read_backbone_weights(tmp_path / "absent.pth", BACKBONES["mae_b16"], model)
    params = make_params(tmp_path)
    entry = {"init": "backbone", "checkpoint": str(tmp_path / "finetuned.pth"), "arch": {"img_size": 32}}
    params["models"]["mae"] = {**entry, "backbone": {"name": "mae_b16", "args": {"depth": 1, "img_size": 32}}}
    params = validate_params(params, "test params")
    with pytest.raises(ParamsError, match=r"models.mae.arch.patch_size is 4 but backbone mae_b16 takes 16"):
        pretrain_model(params, "mae")
    params["models"]["nobackbone"] = {**entry}
    with pytest.raises(ParamsError, match=r"models.nobackbone.backbone: required for init 'backbone'"):
        validate_params(params, "test params")


def test_the_pipeline_depends_on_the_weights_file_and_the_backbone_keys(tmp_path: Path) -> None:
    """The pretrain stage of a backbone (and of an official model) reads its source file and the keys that
    choose what is built from it; its probes read only the model's metrics.json (its identity), as for every model."""
    from tests.probe.test_stage import make_params
    from xtra.config import validate_params
    from xtra.pipeline.dag import stage_table

    params = make_params(tmp_path)
    params["models"]["mae"] = {
        "init": "backbone",
        "backbone": {"name": "mae_h14"},
        "checkpoint": "/weights/mae_pretrain_vit_huge.pth",
        "arch": {"img_size": 224, "patch_size": 14, "block_size": 1},
    }
    params["models"]["rel"] = {"init": "official", "checkpoint": "/weights/xtra_h14.ckpt", "drop_prefixes": ["ema."]}
    params = validate_params(params, "test params", check_paths=False)
    stages = {s.name: s for s in stage_table(params)}
    assert stages["pretrain-mae"].data == ["/weights/mae_pretrain_vit_huge.pth"]
    assert {"models.mae.checkpoint", "models.mae.backbone", "models.mae.arch.img_size"} <= set(
        stages["pretrain-mae"].params
    )
    assert stages["pretrain-rel"].data == ["/weights/xtra_h14.ckpt"]
    assert "models.rel.drop_prefixes" in stages["pretrain-rel"].params
    assert stages["probe-mae-bench_a"].data[0] == f"{tmp_path}/models/mae/metrics.json"  # the model's identity
    assert not any("weights" in path for path in stages["probe-mae-bench_a"].data)
