"""The comparison models, probed under this project's protocol: MAE-B/16, MAE-H/14 and AIM-0.6B, built by timm.

A model entry `init: backbone` names one of `BACKBONES` (`backbone: {name: mae_h14}`) and its LOCAL
weights file (`checkpoint`): timm builds the architecture at random init (`pretrained=False`, nothing
is downloaded) and the weights come from the file, checked key by key. `xtra pretrain M` writes them
into `model.pt` (init "backbone", the timm state dict under `encoder.*`, the backbone's name and
arguments in the provenance); the probe job loads that file with `load_artifact_encoder`, which hands
it a `BackboneEncoder`: the encoder interface of XTRA's (`forward_features(x, blocks)` -> one (B, N, d)
per block asked, before the final norm; `.blocks`, `.width`, `.grid`), so the linear and attentive
probes, their sweeps and the selection are the same code as for XTRA.

The feature rule (what the probes see; `BackboneEncoder.feature_rule()` states it in full):
- attention: the backbone's own, bidirectional (no mask: neither MAE nor AIM probes with one);
- tokens: the patch tokens only (MAE's class token is dropped; AIM has none), as for XTRA;
- blocks: the outputs before the final norm of the trunk's blocks, cut `skip_last` blocks before the
  end: the linear probe reads the last block of the cut trunk, the attentive probe the mean of its last
  `probe.num_last_blocks`. MAE is not cut. AIM-0.6B is cut after block 20 of 24, so that the 6 blocks
  the attentive probe averages are the ones its authors probe ("best layers", blocks 15-20).
Inputs are normalised with the ImageNet mean/std, as both releases (and this project) do.

Weights files: MAE's (`mae_pretrain_vit_base.pth`, `mae_pretrain_vit_huge.pth`: `{"model": ...}` in
timm's names; a visualisation file's decoder keys are dropped by name) or timm's own files of
`vit_base_patch16_224.mae` / `vit_huge_patch14_224.mae` (`.safetensors` or `.bin`). AIM-0.6B's
`aim_600m_2bimgs_attnprobe_backbone.pth` is in AIM's own names (`preprocessor.patchifier.*`,
`trunk.blocks.{i}.norm_1`, ...): renamed by `AIM_KEYS`, and its position embedding, which AIM
computes instead of storing, is computed the same way (`sincos_position_embedding`).

`backbone.args` replaces timm arguments of the backbone (depth, embed_dim, num_heads, img_size,
patch_size): a reduced variant of the same family, for tests and reduced profiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtra.atomic import sha256_file, write_json_atomic
from xtra.errors import CheckpointError, ParamsError
from xtra.model.artifact import ARTIFACT_NAME, ModelArtifact, save_model_artifact
from xtra.model.checkpoint import load_strict

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "AIM_KEYS",
    "BackboneEncoder",
    "build_backbone",
    "sincos_position_embedding",
    "read_backbone_weights",
    "backbone_encoder",
    "write_backbone_model",
]


@dataclass(frozen=True)
class BackboneSpec:
    """One comparison model: its timm architecture, its released weights' layout and its feature rule."""

    name: str
    timm_model: str  # the timm architecture, built with pretrained=False
    timm_args: Mapping[str, Any] = field(default_factory=dict)  # replacing timm's own for it
    layout: str = "timm"  # the weights file's names: "timm" (MAE's and timm's files) or "aim" (renamed by AIM_KEYS)
    drop: tuple[str, ...] = ()  # key prefixes of the weights file that are not the encoder, dropped by name
    skip_last: int = 0  # the trunk the probes see ends this many blocks before the backbone's last
    released_as: str = ""  # the file(s) the weights are published as


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "mae_b16",
            "vit_base_patch16_224",
            drop=("decoder_", "mask_token"),
            released_as="MAE's mae_pretrain_vit_base.pth, or timm's vit_base_patch16_224.mae",
        ),
        BackboneSpec(
            "mae_h14",
            "vit_huge_patch14_224",
            drop=("decoder_", "mask_token"),
            released_as="MAE's mae_pretrain_vit_huge.pth, or timm's vit_huge_patch14_224.mae",
        ),
        BackboneSpec(
            "aim_600m",
            "vit_large_patch14_224",  # timm has no AIM v1 entry: its ViT with AIM-0.6B's settings is one
            timm_args={
                "embed_dim": 1536,
                "depth": 24,
                "num_heads": 12,
                "class_token": False,
                "qkv_bias": False,
                "proj_bias": False,  # no bias in attention projections and MLPs (AIM's use_bias=False)
                "embed_norm_layer": partial(nn.LayerNorm, eps=1e-6),  # AIM's patch embedding ends in a LayerNorm
                "global_pool": "avg",  # (no class token to pool; the probes pool for themselves)
                "fc_norm": False,  # the final norm stays `norm` (AIM's post_trunk_norm)
            },
            layout="aim",
            drop=("head.",),
            skip_last=4,
            released_as="AIM's aim_600m_2bimgs_attnprobe_backbone.pth",
        ),
    )
}

# AIM's names -> timm's, in order (the first matching prefix is renamed; then the block norms)
AIM_KEYS: tuple[tuple[str, str], ...] = (
    ("preprocessor.patchifier.proj.", "patch_embed.proj."),
    ("preprocessor.patchifier.norm.", "patch_embed.norm."),
    ("trunk.post_trunk_norm.", "norm."),
    ("trunk.blocks.", "blocks."),
)
AIM_BLOCK_NORMS = ((".norm_1.", ".norm1."), (".norm_2.", ".norm2."))


def build_backbone(spec: BackboneSpec, args: Mapping[str, Any] | None = None) -> nn.Module:
    """The timm model of `spec` at random init, classifier-free; `args` replace timm arguments."""
    import timm

    try:
        return timm.create_model(spec.timm_model, pretrained=False, num_classes=0, **{**spec.timm_args, **(args or {})})
    except TypeError as exc:
        raise ParamsError(f"backbone {spec.name}: timm refuses the arguments {dict(args or {})}: {exc}") from exc


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """AIM's fixed 2-D sine-cosine position embedding of a grid x grid patch grid: (grid^2, dim), raster order.

    The token at (row r, column c) gets [E(c), E(r)], each E(p) of dim/2 channels = [sin(p w_k), cos(p w_k)]
    for w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1 (the first half encodes the column).
    """
    if dim % 4:
        raise ParamsError(f"a sine-cosine position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)

    def embed(positions: torch.Tensor) -> torch.Tensor:  # (grid^2,) -> (grid^2, dim/2)
        angles = positions[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    return torch.cat([embed(cols.reshape(-1)), embed(rows.reshape(-1))], dim=1)  # (grid^2, dim)


def _aim_to_timm(key: str) -> str | None:
    for ours, theirs in AIM_KEYS:
        if key.startswith(ours):
            key = theirs + key[len(ours) :]
            for old, new in AIM_BLOCK_NORMS:
                key = key.replace(old, new)
            return key
    return None


def read_backbone_weights(path: str | Path, spec: BackboneSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder weights of a backbone's weights file, in timm's names for `model`.

    Read weights-only (a `.safetensors` file with safetensors); the state dict is the file itself or
    its `model` / `state_dict` entry. Keys under `spec.drop` are dropped; an AIM file is renamed and
    given its computed position embedding. What is left must match `model` exactly (load_strict).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} do not exist (they are never downloaded: give a local file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise several types for a bad file
        raise CheckpointError(f"backbone weights {path} cannot be read weights-only: {exc}") from exc
    for entry in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(entry), Mapping):
            loaded = loaded[entry]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"backbone weights {path}: expected a state dict of tensors (or one under 'model')")
    state = {k: v for k, v in loaded.items() if not k.startswith(spec.drop)}
    if spec.layout == "aim":
        renamed = {_aim_to_timm(k): v for k, v in state.items()}
        unknown = sorted(k for k in state if _aim_to_timm(k) is None)
        if unknown:
            raise CheckpointError(f"backbone weights {path}: keys outside AIM's backbone layout: {unknown[:8]}")
        grid, dim = model.patch_embed.grid_size[0], model.embed_dim
        renamed["pos_embed"] = sincos_position_embedding(grid, dim).unsqueeze(0)  # (1, N, d)
        state = renamed
    load_strict(model, state, f"backbone weights {path} ({spec.name})")
    return state


class BackboneEncoder(nn.Module):
    """A timm ViT behind the probe job's encoder interface, its features by its backbone's feature rule."""

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        depth = len(model.blocks)
        if spec.skip_last >= depth:
            raise ParamsError(
                f"backbone {spec.name}: depth {depth} leaves no block once the last {spec.skip_last} are cut "
                f"(its feature rule); give backbone.args.depth > {spec.skip_last}"
            )
        self.model, self.spec = model, spec
        self.depth = depth - spec.skip_last  # the blocks the probes see
        self.width = model.embed_dim
        self.grid = model.patch_embed.grid_size[0]
        self.img_size = model.patch_embed.img_size[0]

    @property
    def blocks(self) -> nn.ModuleList:
        """The trunk the probes see (its first `depth` blocks)."""
        return self.model.blocks[: self.depth]

    def feature_rule(self) -> str:
        prefix = self.model.num_prefix_tokens
        cut = f", cut after block {self.depth} of {len(self.model.blocks)}" if self.spec.skip_last else ""
        return (
            f"{self.spec.name}: bidirectional attention (no mask); the {self.grid**2} patch tokens"
            f"{f' (the {prefix} class token dropped)' if prefix else ''}; block outputs before the final norm"
            f"{cut}: linear probe block {self.depth}, attentive probe the mean of the last probe.num_last_blocks"
        )

    def forward_features(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Outputs (B, N, d) of the chosen blocks of the cut trunk (0-based, negative from its end), patch
        tokens only, before the final norm."""
        wanted = [self.depth - 1] if blocks is None else [b + self.depth if b < 0 else b for b in blocks]
        if any(not 0 <= b < self.depth for b in wanted):
            raise ParamsError(f"blocks {list(blocks or [])} out of range for {self.spec.name}'s {self.depth} blocks")
        take = sorted(set(wanted))
        outs = self.model.forward_intermediates(
            x, indices=take, norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
        )  # [(B, N, d)] in block order, prefix tokens removed
        by_block = dict(zip(take, outs))
        return [by_block[b] for b in wanted]


def backbone_encoder(artifact: ModelArtifact, source: str) -> BackboneEncoder:
    """The BackboneEncoder of a model file of init "backbone", loaded strictly."""
    name, args = artifact.provenance.get("backbone"), artifact.provenance.get("backbone_args", {})
    if name not in BACKBONES:
        raise CheckpointError(f"{source}: backbone {name!r} is none of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    model = build_backbone(spec, args)
    state = {k[len("encoder.") :]: v for k, v in artifact.state_dict.items() if k.startswith("encoder.")}
    load_strict(model, state, f"{source} (backbone {name})")
    return BackboneEncoder(model, spec)


def write_backbone_model(params: dict[str, Any], name: str, out_dir: str | Path, identity: str | None = None) -> Path:
    """Write models/<name>/model.pt and metrics.json of a comparison backbone, both carrying `identity`
    (the pretrain stage's, `xtra.identity`); returns model.pt's path.

    `arch.img_size` and `arch.patch_size` must be the backbone's: they tell the probe job the input
    side (the other arch keys are unused by a backbone).
    """
    model_cfg = params["models"][name]
    where = f"models.{name}"
    spec = BACKBONES[model_cfg["backbone"]["name"]]
    args = dict(model_cfg["backbone"].get("args", {}))
    model = build_backbone(spec, args)
    encoder = BackboneEncoder(model, spec)
    side, patch = encoder.img_size, model.patch_embed.patch_size[0]
    arch = dict(model_cfg["arch"])
    for key, value in (("img_size", side), ("patch_size", patch)):
        if arch.get(key) != value:
            raise ParamsError(
                f"{where}.arch.{key} is {arch.get(key)!r} but backbone {spec.name} takes {value} "
                f"(set {where}.arch.{key}={value})"
            )
    state = read_backbone_weights(model_cfg["checkpoint"], spec, model)
    out = Path(out_dir)
    path = out / ARTIFACT_NAME
    params_count = sum(p.numel() for p in model.parameters())
    save_model_artifact(
        path,
        init="backbone",
        arch=arch,
        state_dict={f"encoder.{k}": v for k, v in state.items()},
        provenance={
            "model": name,
            "backbone": spec.name,
            "backbone_args": args,
            "timm_model": spec.timm_model,
            "converted_from": str(model_cfg["checkpoint"]),
            "source_sha256": sha256_file(model_cfg["checkpoint"]),
            "feature_rule": encoder.feature_rule(),
            "parameters": params_count,
            "identity": identity,
        },
    )
    write_json_atomic(
        out / "metrics.json",
        {
            "identity": identity,
            "model": name,
            "init": "backbone",
            "backbone": spec.name,
            "parameters": params_count,
            "steps": 0,
        },
        indent=1,
    )
    print(f"{name}: wrote backbone {spec.name} ({params_count:,} parameters) to {path}: {encoder.feature_rule()}")
    return path
