"""`xtra convert-checkpoint`: import the weights of the official XTRA release, strictly, into `model.pt`.

The release ships Lightning `.ckpt` files (weights under `state_dict`, its settings under
`hyper_parameters`) or DeepSpeed `mp_rank_00_model_states.pt` files (weights under `module`). Their keys:
`enc.patch_embed.proj.*`, `enc.pos_embed`, `enc.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
`enc.norm.*`, `proj.mlp.{0,2}.*`, `predictor.pos_embed`, `predictor.blocks.{i}.*`, `predictor.norm.*`,
`aim_proj.{j}.mlp.{0,2}.*`, possibly behind a `model.`, `module.`, `_orig_mod.` or `_forward_module.`
wrapper prefix (stripped, repeatedly). Fine-tuned files hold the encoder alone (plus a classifier,
named with `--drop`): they become an encoder-only model file that probing accepts.

Every key is either mapped onto this project's model or named in an explicit drop list; anything
else, a missing key or a shape mismatch, is an error naming the keys in the RELEASE's vocabulary
(`aim_proj.1.mlp.0.weight`) with the arch setting that would fix it. Head counts cannot be read from
tensor shapes: when the file stores `hyper_parameters`, every architecture setting found there
(`HPARAM_NAMES`) must equal the arch given, or the conversion stops naming the key.

The file is read with `torch.load(weights_only=True)`, with only `SAFE_GLOBALS` allowed beyond
tensors and plain containers: nothing else in the file is executed.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from xtra.atomic import sha256_file
from xtra.errors import CheckpointError, ParamsError
from xtra.model.arch import MODEL_PRESETS, PRESETS, ArchConfig
from xtra.model.artifact import save_model_artifact
from xtra.model.checkpoint import load_strict
from xtra.model.xtra import XTRA, build_arch_encoder

__all__ = [
    "PREFIX_MAP",
    "WRAPPERS",
    "HPARAM_NAMES",
    "official_state_dict",
    "map_official_keys",
    "read_release_file",
    "check_hyper_parameters",
    "convert_official",
    "arch_from_cli",
    "configure_parser",
    "run",
]

# official prefix -> this project's module prefix (inside XTRA)
PREFIX_MAP: dict[str, str] = {
    "enc.": "encoder.",
    "proj.": "proj.",
    "predictor.": "predictor.",
    "aim_proj.": "pixel_heads.",
}
WRAPPERS = ("_forward_module.", "model.", "module.", "_orig_mod.")
# names of architecture settings in stored hyper_parameters (release-style and this project's) -> arch key
HPARAM_NAMES: dict[str, str] = {
    "embed_dim": "width",
    "width": "width",
    "enc.embed_dim": "width",
    "depth": "depth",
    "enc.depth": "depth",
    "num_heads": "num_heads",
    "heads": "num_heads",
    "enc.num_heads": "num_heads",
    "img_size": "img_size",
    "patch_size": "patch_size",
    "block_size": "block_size",
    "decoder.embed_dim": "predictor_width",
    "decoder.depth": "predictor_depth",
    "decoder.num_heads": "predictor_num_heads",
    "decoder_embed_dim": "predictor_width",
    "predictor_embed_dim": "predictor_width",
    "predictor_width": "predictor_width",
    "predictor.embed_dim": "predictor_width",
    "decoder_depth": "predictor_depth",
    "predictor_depth": "predictor_depth",
    "predictor.depth": "predictor_depth",
    "decoder_num_heads": "predictor_num_heads",
    "predictor_num_heads": "predictor_num_heads",
    "predictor_heads": "predictor_num_heads",
    "predictor.num_heads": "predictor_num_heads",
    "num_heads_ahead": "num_heads_ahead",
    "proj_hidden": "proj_hidden",
    "head_hidden": "head_hidden",
}
# (release key prefix, arch setting that changes its shape or count), most specific first
_FIX_HINTS: tuple[tuple[str, str], ...] = (
    ("enc.patch_embed.", "arch.patch_size / arch.width"),
    ("enc.pos_embed", "arch.img_size / arch.patch_size"),
    ("enc.blocks.", "arch.depth / arch.width (or --preset)"),
    ("enc.norm.", "arch.width"),
    ("proj.", "arch.proj_hidden / arch.predictor_width"),
    ("predictor.pos_embed", "arch.img_size / arch.predictor_width"),
    ("predictor.blocks.", "arch.predictor_depth / arch.predictor_width"),
    ("predictor.", "arch.predictor_width"),
    ("aim_proj.", "arch.num_heads_ahead / arch.head_hidden / arch.block_size"),
)


def _safe_globals() -> list:
    """Beyond tensors and plain containers: argparse.Namespace (older Lightning hparams) and paths.

    (torch's weights-only unpickler fills no dict subclass, so a file whose hyper_parameters are a
    Lightning AttributeDict is refused, naming it; it is re-saved with plain dicts in a trusted session.)
    """
    import argparse as _argparse
    import pathlib

    return [_argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]


def read_release_file(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with the allow-list; a missing, foreign or unsafe file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "global" in line.lower() or line.startswith("Can only")), lines[-1])
        raise CheckpointError(
            f"{path}: refused by the weights-only loader (an object outside the allow-list "
            f"of xtra.model.convert): {why}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file?): {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def official_state_dict(ckpt: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The weights of a Lightning (`state_dict`) or DeepSpeed (`module`) file, wrapper prefixes removed."""
    for field in ("state_dict", "module"):
        if isinstance(ckpt.get(field), Mapping):
            state = dict(ckpt[field])
            break
    else:
        raise CheckpointError(
            f"{source}: neither 'state_dict' (Lightning) nor 'module' (DeepSpeed) found; "
            f"top-level keys: {sorted(ckpt)[:10]}"
        )
    stripped = True
    while stripped and state:
        stripped = False
        for wrapper in WRAPPERS:
            if all(k.startswith(wrapper) for k in state):
                state, stripped = {k[len(wrapper) :]: v for k, v in state.items()}, True
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
            mapped[PREFIX_MAP[prefix] + key[len(prefix) :]] = value
    if unknown:
        raise CheckpointError(
            f"{source}: keys neither mapped nor listed as dropped: {sorted(unknown)[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (pass --drop PREFIX to drop them)"
        )
    return mapped


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(tree, argparse.Namespace):
        yield from _flat(vars(tree), prefix)
    else:
        yield prefix[:-1], tree


def check_hyper_parameters(ckpt: Mapping[str, Any], cfg: ArchConfig, source: str) -> list[str]:
    """Compare the file's stored architecture settings with `cfg`; returns the keys checked.

    A stored key matches a name of HPARAM_NAMES by its full dotted path or its last one or two parts
    (`model.enc.num_heads` -> `enc.num_heads`); a disagreement is a CheckpointError naming both keys.
    """
    stored = ckpt.get("hyper_parameters")
    if not isinstance(stored, (Mapping, argparse.Namespace)):
        return []
    checked, wrong = [], []
    for path, value in _flat(stored):
        parts = path.split(".")
        name = next((n for n in (path, ".".join(parts[-2:]), parts[-1]) if n in HPARAM_NAMES), None)
        if name is None or isinstance(value, bool) or not isinstance(value, int):
            continue
        key = HPARAM_NAMES[name]
        checked.append(path)
        if getattr(cfg, key) != value:
            wrong.append(
                f"hyper_parameters {path!r} = {value} but arch.{key} = {getattr(cfg, key)} (set arch.{key}={value})"
            )
    if wrong:
        raise CheckpointError(
            f"{source}: the architecture given disagrees with the file's stored hyper_parameters: " + "; ".join(wrong)
        )
    return checked


def _release_key(ours: str) -> str:
    for official, project in PREFIX_MAP.items():
        if ours.startswith(project):
            return official + ours[len(project) :]
    return ours


def _hint(release_key: str) -> str:
    return next((fix for prefix, fix in _FIX_HINTS if release_key.startswith(prefix)), "the arch section")


def _load_in_release_terms(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, prefix: str = ""
) -> None:
    """load_strict, with an error that names the release's keys and the arch setting that fixes each."""
    try:
        load_strict(module, state, source)
    except CheckpointError:
        own = module.state_dict()
        lines = []
        for label, keys in (
            ("missing in the file", sorted(set(own) - set(state))),
            ("in the file, not in the arch", sorted(set(state) - set(own))),
            (
                "shape mismatch",
                sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)),
            ),
        ):
            for key in keys[:6]:
                release = _release_key(prefix + key)
                shape = (
                    f" file {tuple(state[key].shape)} vs arch {tuple(own[key].shape)}"
                    if label == "shape mismatch"
                    else ""
                )
                lines.append(f"{label}: {release}{shape} (check {_hint(release)})")
            if len(keys) > 6:
                lines.append(f"{label}: +{len(keys) - 6} more")
        raise CheckpointError(f"{source} does not match the architecture: " + "; ".join(lines)) from None


def convert_official(
    src: str | Path, dst: str | Path, arch: dict[str, Any], drop: Sequence[str] = ()
) -> dict[str, Any]:
    """Convert `src` into this project's model file `dst` (model.pt); returns what was kept, dropped, checked."""
    cfg = ArchConfig.from_dict(arch)
    ckpt = read_release_file(src)
    checked = check_hyper_parameters(ckpt, cfg, str(src))
    state = official_state_dict(ckpt, str(src))
    mapped = map_official_keys(state, drop, str(src))
    encoder_only = bool(mapped) and all(k.startswith("encoder.") for k in mapped)
    if encoder_only:  # a fine-tuned file: the encoder alone is what probing needs
        module: torch.nn.Module = build_arch_encoder(cfg)
        inner = {k[len("encoder.") :]: v for k, v in mapped.items()}
        _load_in_release_terms(module, inner, str(src), prefix="encoder.")
        weights = {f"encoder.{k}": v for k, v in module.state_dict().items()}
    else:
        module = XTRA(cfg)
        _load_in_release_terms(module, mapped, str(src))
        weights = module.state_dict()
    provenance = {
        "converted_from": str(src),
        "source_sha256": sha256_file(src),
        "encoder_only": encoder_only,
        "hyper_parameters_checked": checked,
        "dropped_prefixes": list(drop),
    }
    save_model_artifact(dst, init="official", arch=asdict(cfg), state_dict=weights, provenance=provenance)
    dropped = sorted(k for k in state if k.startswith(tuple(drop)))
    what = "encoder-only" if encoder_only else "full"
    print(
        f"converted {src} -> {dst} ({what} model): {len(mapped)} tensors mapped, {len(dropped)} dropped, "
        f"{len(checked)} stored hyper_parameters checked"
    )
    return {"mapped": len(mapped), "dropped": dropped, "encoder_only": encoder_only, "checked": checked}


def _parse_set(item: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.startswith("arch.") or len(key) <= len("arch."):
        raise ParamsError(f"--set {item!r}: expected arch.KEY=VALUE (e.g. arch.width=192)")
    return key[len("arch.") :], yaml.safe_load(value)


def arch_from_cli(preset: str | None, arch_file: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """The architecture of --preset (a size or a paper model) or --arch-file (YAML), then every --set."""
    import yaml

    if preset in MODEL_PRESETS:
        arch = dict(MODEL_PRESETS[preset])
    elif preset in PRESETS:
        arch = {"preset": preset}
    elif arch_file:
        loaded = yaml.safe_load(Path(arch_file).read_text())
        arch = dict(loaded.get("arch", loaded)) if isinstance(loaded, dict) else None
        if arch is None:
            raise ParamsError(f"{arch_file}: expected a mapping of arch keys (or one under `arch:`)")
    else:
        raise ParamsError(
            "give --preset, --arch-file, or --params with --model, to say which architecture the file holds"
        )
    arch.update(dict(_parse_set(item) for item in sets))
    ArchConfig.from_dict(arch)  # an unknown key or a bad combination: ParamsError naming it
    return arch


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official .ckpt (Lightning) or mp_rank_00_model_states.pt (DeepSpeed)")
    parser.add_argument("dst", help="model file to write (e.g. models/xtra_b16_official/model.pt)")
    parser.add_argument(
        "--preset",
        choices=sorted({*MODEL_PRESETS, *PRESETS}),
        help="architecture of the release (xtra_b16, xtra_h14) or a size preset",
    )
    parser.add_argument("--arch-file", default=None, help="a YAML file of arch keys (a model's arch section)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="arch.KEY=VALUE",
        help="override one arch key (repeatable), e.g. --set arch.width=192",
    )
    parser.add_argument("--params", default=None, help="take the architecture from this params file...")
    parser.add_argument("--model", default=None, help="...and this model of it")
    parser.add_argument("--drop", action="append", default=[], help="official key prefix to drop (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.params and args.model and not (args.preset or args.arch_file):
        from xtra.config import load_params, model_arch

        arch = {**model_arch(load_params(args.params, check_paths=False), args.model)}
        arch.update(dict(_parse_set(item) for item in args.set))
    else:
        arch = arch_from_cli(args.preset, args.arch_file, args.set)
    convert_official(args.src, args.dst, arch, args.drop)
    return 0
