"""Reading and writing this project's checkpoints, strictly.

A checkpoint is a Lightning `.ckpt` whose `hyper_parameters["arch"]` is the model's arch section and
whose `state_dict` keys are `model.encoder.*`, `model.proj.*`, `model.predictor.*`, `model.pixel_heads.*`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtra.atomic import save_torch_atomic
from xtra.errors import CheckpointError
from xtra.model.arch import ArchConfig
from xtra.model.vit import Encoder
from xtra.model.xtra import XTRA, build_arch_encoder

__all__ = [
    "read_checkpoint",
    "load_strict",
    "load_encoder",
    "load_xtra",
    "save_model_checkpoint",
    "load_artifact_encoder",
]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load a checkpoint on CPU; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file?): {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, failing with every missing, unexpected or mis-shaped key named."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {keys[:8]}{more}")
        raise CheckpointError(f"{source} does not match the architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _arch_of(ckpt: dict[str, Any], source: str) -> ArchConfig:
    arch = (ckpt.get("hyper_parameters") or {}).get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{source}: no hyper_parameters['arch'] (not a checkpoint of this project?)")
    return ArchConfig.from_dict(arch)


def _sub_state(ckpt: dict[str, Any], prefix: str, source: str) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: no state_dict")
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_xtra(path: str | Path, expected_arch: dict[str, Any] | None = None) -> XTRA:
    """The full pre-training model of a checkpoint, loaded strictly."""
    ckpt = read_checkpoint(path)
    cfg = _check_arch(_arch_of(ckpt, str(path)), expected_arch, str(path))
    model = XTRA(cfg)
    load_strict(model, _sub_state(ckpt, "model.", str(path)), str(path))
    return model


def load_encoder(path: str | Path, expected_arch: dict[str, Any] | None = None) -> tuple[Encoder, ArchConfig]:
    """The frozen encoder of a checkpoint (eval mode, no gradients) and its architecture."""
    ckpt = read_checkpoint(path)
    cfg = _check_arch(_arch_of(ckpt, str(path)), expected_arch, str(path))
    encoder = build_arch_encoder(cfg)
    load_strict(encoder, _sub_state(ckpt, "model.encoder.", str(path)), f"{path} (encoder)")
    # probing keeps raster order, also for a pseudo-random-order model (as the release does)
    encoder.eval().requires_grad_(False)
    return encoder, cfg


def load_artifact_encoder(
    path: str | Path, expected_arch: dict[str, Any] | None = None
) -> tuple[nn.Module, ArchConfig, str]:
    """The frozen encoder of a final model file (`models/<m>/model.pt`), its architecture and init.

    init "pixels" gives a `PixelEncoder` (no weights); init "backbone" a comparison model's
    `BackboneEncoder` (xtra.release.backbones); every other init the encoder of the arch, loaded
    strictly from the file's `encoder.*` tensors (a full model or an encoder-only file).
    """
    from xtra.model.artifact import read_model_artifact
    from xtra.probe.pixels import PixelEncoder

    artifact = read_model_artifact(path)
    cfg = _check_arch(ArchConfig.from_dict(artifact.arch), expected_arch, str(path))
    if artifact.init == "pixels":
        return PixelEncoder(cfg.img_size).eval().requires_grad_(False), cfg, artifact.init
    if artifact.init == "backbone":
        from xtra.release.backbones import backbone_encoder

        return backbone_encoder(artifact, str(path)).eval().requires_grad_(False), cfg, artifact.init
    encoder = build_arch_encoder(cfg)
    state = {k[len("encoder.") :]: v for k, v in artifact.state_dict.items() if k.startswith("encoder.")}
    load_strict(encoder, state, f"{path} (encoder)")
    # probing keeps raster order, also for a pseudo-random-order model (as the release does)
    return encoder.eval().requires_grad_(False), cfg, artifact.init


def _check_arch(found: ArchConfig, expected: dict[str, Any] | None, source: str) -> ArchConfig:
    if expected is not None:
        want = ArchConfig.from_dict(expected)
        diffs = [
            f"{k}: checkpoint {getattr(found, k)!r} vs params {getattr(want, k)!r}"
            for k in want.__dataclass_fields__
            if k != "attn_impl" and getattr(found, k) != getattr(want, k)
        ]
        if diffs:
            raise CheckpointError(f"{source} has a different architecture than params: " + "; ".join(diffs))
    return found


def save_model_checkpoint(
    model: XTRA, path: str | Path, arch: dict[str, Any], extra: dict | None = None, drop: Sequence[str] = ()
) -> None:
    """Write a checkpoint of this project's layout (used for the random-init control and conversions)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith(tuple(drop))}
    ckpt = {"state_dict": state, "hyper_parameters": {"arch": arch}, "global_step": 0, "epoch": 0, **(extra or {})}
    save_torch_atomic(ckpt, path)
