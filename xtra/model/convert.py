"""`xtra convert-checkpoint`: import the weights of the official XTRA release, strictly.

The release ships Lightning `.ckpt` files (weights under `state_dict`) or DeepSpeed
`mp_rank_00_model_states.pt` files (weights under `module`). Their keys:
`enc.patch_embed.proj.*`, `enc.pos_embed`, `enc.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
`enc.norm.*`, `proj.mlp.{0,2}.*`, `predictor.pos_embed`, `predictor.blocks.{i}.*`, `predictor.norm.*`,
`aim_proj.{j}.mlp.{0,2}.*`, possibly behind a `model.` or `module.` wrapper prefix.
Every key is either mapped onto this project's model or named in an explicit drop list; anything
else, a missing key or a shape mismatch, is an error that lists the keys.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from xtra.errors import CheckpointError, ParamsError
from xtra.model.checkpoint import load_strict, read_checkpoint, save_model_checkpoint
from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.xtra import XTRA

__all__ = ["PREFIX_MAP", "official_state_dict", "map_official_keys", "convert_official", "configure_parser", "run"]

# official prefix -> this project's module prefix (inside XTRA)
PREFIX_MAP: dict[str, str] = {"enc.": "encoder.", "proj.": "proj.", "predictor.": "predictor.", "aim_proj.": "heads."}
WRAPPERS = ("model.", "module.", "_orig_mod.")


def official_state_dict(ckpt: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The weights of a Lightning (`state_dict`) or DeepSpeed (`module`) file, wrapper prefixes removed."""
    for field in ("state_dict", "module"):
        if isinstance(ckpt.get(field), Mapping):
            state = dict(ckpt[field])
            break
    else:
        raise CheckpointError(f"{source}: neither 'state_dict' (Lightning) nor 'module' (DeepSpeed) found; "
                              f"top-level keys: {sorted(ckpt)[:10]}")
    for wrapper in WRAPPERS:
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
    return state


def map_official_keys(state: Mapping[str, torch.Tensor], drop: Sequence[str], source: str) -> dict:
    """Rename official keys to this project's; keys under a `drop` prefix are left out on purpose."""
    mapped, unknown = {}, []
    for key, value in state.items():
        if key.startswith(tuple(drop)):
            continue
        prefix = next((p for p in PREFIX_MAP if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            mapped[PREFIX_MAP[prefix] + key[len(prefix):]] = value
    if unknown:
        raise CheckpointError(f"{source}: keys neither mapped nor listed as dropped: {sorted(unknown)[:10]}"
                              f"{' ...' if len(unknown) > 10 else ''} (pass --drop PREFIX to drop them)")
    return mapped


def convert_official(src: str | Path, dst: str | Path, arch: dict[str, Any],
                     drop: Sequence[str] = ()) -> dict[str, Any]:
    """Convert `src` into a checkpoint of this project at `dst`; returns what was kept and dropped."""
    cfg = ArchConfig.from_dict(arch)
    ckpt = read_checkpoint(src)
    state = official_state_dict(ckpt, str(src))
    mapped = map_official_keys(state, drop, str(src))
    model = XTRA(cfg)
    load_strict(model, mapped, str(src))
    save_model_checkpoint(model, dst, asdict(cfg), extra={"converted_from": str(src)})
    dropped = sorted(k for k in state if k.startswith(tuple(drop)))
    print(f"converted {src} -> {dst}: {len(mapped)} tensors mapped, {len(dropped)} dropped")
    return {"mapped": len(mapped), "dropped": dropped}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official .ckpt (Lightning) or mp_rank_00_model_states.pt (DeepSpeed)")
    parser.add_argument("dst", help="checkpoint to write (e.g. models/xtra_b16_official/last.ckpt)")
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="architecture of the release")
    parser.add_argument("--params", default=None, help="take the architecture from this params file...")
    parser.add_argument("--model", default=None, help="...and this model of it")
    parser.add_argument("--drop", action="append", default=[], help="official key prefix to drop (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.preset:
        arch = dict(MODEL_PRESETS[args.preset])
    elif args.params and args.model:
        from xtra.config import load_params, model_arch

        arch = model_arch(load_params(args.params, check_paths=False), args.model)
    else:
        raise ParamsError("give --preset, or --params with --model, to say which architecture the file holds")
    convert_official(args.src, args.dst, arch, args.drop)
    return 0
