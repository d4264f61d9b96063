"""`xtra convert-checkpoint`: import a checkpoint of the public XTRA release, strictly, into `model.pt`.

The release's files (facts in RELEASE-FORMAT.md; a user's guide in docs/release.md) are Lightning
checkpoints written by `trainer.save_checkpoint`: the weights under `state_dict`, the release's whole
config under `hyper_parameters` as ONE FLAT dict of about 90 keys joined by underscores (`enc_arch`,
`enc_img_size`, `predictor_num_heads`, ...), and `optimizer_states`, `lr_schedulers`, `loops`,
`callbacks` (read with the rest, then ignored). DeepSpeed `mp_rank_00_model_states.pt` files (weights
under `module`, no hyper-parameters) are read too. Two kinds of release file:

- a pre-training file (no `module` hyper-parameter): `enc.*`, `proj.*`, `predictor.*`, `aim_proj.*`.
  Every architecture hyper-parameter it stores (`RELEASE_HPARAMS`, `enc_arch`, `RELEASE_FIXED`) must
  agree with the arch given, and the whole model is converted;
- a fine-tuned file (`module: classifier`): `enc.*` and `classifier.*`. The classifier is dropped by
  name, only the encoder's hyper-parameters are checked (the predictor, projection and pixel-head
  settings it inherits from the release's base config describe no weight in it: they are reported as
  ignored), and the encoder alone is written: an encoder-only model file that the probe job loads
  under the profile's arch.

Every key is mapped (`PREFIX_MAP`) or dropped by name (the classifier of a fine-tuned file, or a
`drop` prefix); anything else, a missing key or a shape mismatch is an error naming the keys in the
RELEASE's vocabulary (`aim_proj.1.mlp.0.weight`) and the arch setting that would fix it. Head counts
cannot be read from tensor shapes: only the stored hyper-parameters catch a wrong one.

All names shared by the release and this project live in the tables at the top (state-dict
prefixes, hyper-parameters, encoder sizes, the release's parameter order): a rename on either side
is an edit there and nowhere else.

The file is read with `torch.load(weights_only=True, mmap=True)` (an H/14 file with its AdamW state
is about 10 GB: mapped, not read), with only `_safe_globals()` allowed beyond tensors and plain
containers: nothing in the file is executed.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable, Mapping, Sequence
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
    "CLASSIFIER_PREFIX",
    "WRAPPERS",
    "ENC_ARCH",
    "ENC_ARCH_KEYS",
    "RELEASE_HPARAMS",
    "RELEASE_FIXED",
    "release_key",
    "read_release_file",
    "release_hyper_parameters",
    "official_state_dict",
    "map_official_keys",
    "check_hyper_parameters",
    "convert_official",
    "arch_from_cli",
    "configure_parser",
    "run",
]

# ---------------------------------------------------------------- the release's names <-> this project's

# state-dict prefix of the release -> this project's module prefix (inside XTRA)
PREFIX_MAP: dict[str, str] = {
    "enc.": "encoder.",
    "proj.": "proj.",
    "predictor.": "predictor.",
    "aim_proj.": "pixel_heads.",
}
# a fine-tuned file's classifier (attention pooling, BatchNorm, linear layer): dropped by name
CLASSIFIER_PREFIX = "classifier."
# wrappers around the keys of some files (Lightning, DeepSpeed, torch.compile): stripped, repeatedly
WRAPPERS = ("_forward_module.", "model.", "module.", "_orig_mod.")

# `enc_arch` (the release stores the size's name, never its numbers) -> this project's size preset
ENC_ARCH: dict[str, str] = {
    "vit_tiny": "tiny",
    "vit_small": "small",
    "vit_base": "base",
    "vit_large": "large",
    "vit_huge": "huge",
}
# the arch keys a size preset fixes
ENC_ARCH_KEYS = ("width", "depth", "num_heads")
# `enc_patch_size` is absent in the B/16 files: the release's default applies
RELEASE_DEFAULT_PATCH_SIZE = 16

ENCODER, PRETRAIN = "encoder", "pretrain"  # what a hyper-parameter describes (a fine-tuned file: the encoder only)


def _one_int(value: Any) -> int:
    """`enc_img_size` is a list of one int (`[256]`)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0])
    raise ValueError("expected a list of one int, as the release writes it ([224])")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an int")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected a bool")
    return value


# release hyper-parameter -> (this project's arch key, what it describes, release value -> arch value)
RELEASE_HPARAMS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "enc_img_size": ("img_size", ENCODER, _one_int),
    "enc_patch_size": ("patch_size", ENCODER, _int),
    "enc_block_size": ("block_size", ENCODER, _int),
    "predictor_block_size": ("block_size", PRETRAIN, _int),
    "proj_hidden_dim": ("proj_hidden", PRETRAIN, _int),
    "proj_out_dim": ("predictor_width", PRETRAIN, _int),
    "predictor_num_heads": ("predictor_num_heads", PRETRAIN, _int),
    "predictor_depth": ("predictor_depth", PRETRAIN, _int),
    "aim_num_tokens": ("num_heads_ahead", PRETRAIN, _int),
    "aim_proj_hidden_dim": ("head_hidden", PRETRAIN, _int),
    "aim_norm_pix_loss": ("norm_pix_loss", PRETRAIN, _flag),
    "aim_l1_loss": ("loss", PRETRAIN, lambda value: "l1" if _flag(value) else "mse"),
    "aim_pseudo_random": ("block_order", PRETRAIN, lambda value: "pseudo_random" if _flag(value) else "raster"),
}
# release settings this project's model has no key for: the one value it implements, and what they describe
RELEASE_FIXED: dict[str, tuple[Any, str]] = {
    "enc_is_block_causal": (True, ENCODER),
    "predictor_is_block_causal": (True, PRETRAIN),
    "proj_nlayers": (2, PRETRAIN),
    "proj_in_bn": (False, PRETRAIN),
    "aim_proj_nlayers": (2, PRETRAIN),
    "aim_proj_in_bn": (False, PRETRAIN),
    "aim_proj_out_bias": (True, PRETRAIN),
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


def release_key(ours: str) -> str:
    """This project's key (`pixel_heads.0.mlp.0.weight`) in the release's vocabulary (`aim_proj.0.mlp.0.weight`)."""
    for official, project in PREFIX_MAP.items():
        if ours.startswith(project):
            return official + ours[len(project) :]
    return ours


# ---------------------------------------------------------------- reading a release file


def _safe_globals() -> list:
    """Beyond tensors and plain containers: argparse.Namespace (older Lightning hparams) and paths.

    (torch's weights-only unpickler fills no dict subclass, so a file whose hyper_parameters are a
    Lightning AttributeDict is refused, naming it; it is re-saved with plain dicts in a trusted session.)
    """
    import pathlib

    return [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]


def read_release_file(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True, mmap=True) with the allow-list; a missing, foreign or unsafe file is a
    CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "global" in line.lower() or line.startswith("Can only")), lines[-1])
        raise CheckpointError(
            f"{path}: refused by the weights-only loader (an object outside the allow-list "
            f"of xtra.release.convert): {why}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file?): {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def release_hyper_parameters(ckpt: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The file's flat `hyper_parameters` dict ({} when it stores none, as DeepSpeed files do).

    A stored dict without `enc_arch` is not the release's config (a file of another code base, or
    of this project): refused, since nothing of it could be checked.
    """
    stored = ckpt.get("hyper_parameters")
    if stored is None:
        return {}
    if isinstance(stored, argparse.Namespace):
        stored = vars(stored)
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{source}: hyper_parameters is a {type(stored).__name__}, not the release's flat dict")
    if "enc_arch" not in stored:
        raise CheckpointError(
            f"{source}: hyper_parameters has no 'enc_arch': not a file of the XTRA release (its keys: "
            f"{sorted(stored)[:12]}{' ...' if len(stored) > 12 else ''})"
        )
    return dict(stored)


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
    """Rename the release's keys to this project's; keys under a `drop` prefix are left out on purpose."""
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
            f"{' ...' if len(unknown) > 10 else ''} (pass --drop PREFIX, or drop_prefixes in params, to drop them)"
        )
    return mapped


def check_hyper_parameters(
    hparams: Mapping[str, Any], cfg: ArchConfig, source: str, encoder_only: bool = False
) -> tuple[list[str], list[str]]:
    """Compare the release's stored hyper-parameters with `cfg`; returns (keys checked, keys ignored).

    `enc_arch` fixes width/depth/heads (its preset's numbers); `enc_patch_size`, when absent, is the
    release's default 16. For an encoder-only (fine-tuned) file only the encoder's keys are checked:
    the others are returned as ignored. Every disagreement is named in one CheckpointError, each with
    the release key, both values and the arch setting that fixes it.
    """
    if not hparams:
        return [], []
    stored = dict(hparams)
    if "enc_patch_size" not in stored:
        stored["enc_patch_size"] = RELEASE_DEFAULT_PATCH_SIZE
    checked, ignored, wrong = [], [], []

    name = stored["enc_arch"]
    checked.append("enc_arch")
    preset = ENC_ARCH.get(name) if isinstance(name, str) else None
    if preset is None:
        wrong.append(f"'enc_arch' = {name!r} is no encoder size this project has (known: {sorted(ENC_ARCH)})")
    else:
        size = PRESETS[preset]
        off = [k for k in ENC_ARCH_KEYS if getattr(cfg, k) != size[k]]
        if off:
            wrong.append(
                f"'enc_arch' = {name!r} ({', '.join(f'{k} {size[k]}' for k in ENC_ARCH_KEYS)}) but the arch has "
                f"{', '.join(f'{k} {getattr(cfg, k)}' for k in off)} (set arch.preset={preset} without "
                f"{'/'.join(ENC_ARCH_KEYS)} overrides, or {' '.join(f'arch.{k}={size[k]}' for k in off)})"
            )

    for key, (arch_key, part, read) in RELEASE_HPARAMS.items():
        if key not in stored:
            continue
        if encoder_only and part != ENCODER:
            ignored.append(key)
            continue
        checked.append(key)
        try:
            value = read(stored[key])
        except ValueError as exc:
            wrong.append(f"{key!r} = {stored[key]!r}: {exc}")
            continue
        if getattr(cfg, arch_key) != value:
            absent = " (absent: the release's default)" if key not in hparams else ""
            wrong.append(
                f"{key!r} = {stored[key]!r}{absent} but arch.{arch_key} = {getattr(cfg, arch_key)!r} "
                f"(set arch.{arch_key}={value})"
            )

    for key, (required, part) in RELEASE_FIXED.items():
        if key not in stored:
            continue
        if encoder_only and part != ENCODER:
            ignored.append(key)
            continue
        checked.append(key)
        if stored[key] != required:
            wrong.append(f"{key!r} = {stored[key]!r}: this project's model implements only {required!r}")

    if wrong:
        raise CheckpointError(
            f"{source}: the architecture given disagrees with the file's stored hyper_parameters: " + "; ".join(wrong)
        )
    return checked, ignored


# ---------------------------------------------------------------- converting


def _hint(key: str) -> str:
    return next((fix for prefix, fix in _FIX_HINTS if key.startswith(prefix)), "the arch section")


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
                release = release_key(prefix + key)
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
    src: str | Path, dst: str | Path, arch: dict[str, Any], drop: Sequence[str] = (), identity: str | None = None
) -> dict[str, Any]:
    """Convert the release file `src` into this project's model file `dst` (model.pt).

    Returns what was done: tensors mapped, keys dropped, hyper-parameters checked and ignored, the
    module that wrote the file, and whether the result is encoder-only. `identity` (the pretrain
    stage's, `xtra.identity`) goes into the file's provenance.
    """
    cfg = ArchConfig.from_dict(arch)
    source = str(src)
    ckpt = read_release_file(src)
    hparams = release_hyper_parameters(ckpt, source)
    written_by = str(hparams.get("module") or "pretrain")
    classifier = written_by == "classifier"
    checked, ignored = check_hyper_parameters(hparams, cfg, source, encoder_only=classifier)
    state = official_state_dict(ckpt, source)
    dropping = (*([CLASSIFIER_PREFIX] if classifier else []), *drop)
    mapped = map_official_keys(state, dropping, source)
    foreign = sorted(release_key(k) for k in mapped if not k.startswith(PREFIX_MAP["enc."]))
    if classifier and foreign:
        raise CheckpointError(
            f"{source}: a fine-tuned file (module 'classifier') holds keys beyond the encoder: {foreign[:6]} "
            "(pass --drop PREFIX, or drop_prefixes in params, to drop them)"
        )
    encoder_only = classifier or (bool(mapped) and not foreign)
    if encoder_only:  # the encoder alone is what probing needs
        module: torch.nn.Module = build_arch_encoder(cfg)
        inner = {k[len(PREFIX_MAP["enc."]) :]: v for k, v in mapped.items()}
        _load_in_release_terms(module, inner, source, prefix=PREFIX_MAP["enc."])
        weights = {f"{PREFIX_MAP['enc.']}{k}": v for k, v in module.state_dict().items()}
    else:
        module = XTRA(cfg)
        _load_in_release_terms(module, mapped, source)
        weights = module.state_dict()
    dropped = sorted(k for k in state if k.startswith(dropping))
    provenance = {
        "converted_from": source,
        "source_sha256": sha256_file(src),
        "written_by": written_by,
        "encoder_only": encoder_only,
        "hyper_parameters_checked": checked,
        "hyper_parameters_ignored": ignored,
        "dropped_prefixes": list(dropping),
        **({"identity": identity} if identity else {}),
    }
    save_model_artifact(dst, init="official", arch=asdict(cfg), state_dict=weights, provenance=provenance)
    what = "encoder-only" if encoder_only else "full"
    unchecked = "" if hparams else " (the file stores no hyper_parameters: head counts are unchecked)"
    print(
        f"converted {src} ({written_by} file) -> {dst} ({what} model): {len(mapped)} tensors mapped, "
        f"{len(dropped)} dropped, {len(checked)} stored hyper_parameters checked, {len(ignored)} ignored{unchecked}"
    )
    return {
        "mapped": len(mapped),
        "dropped": dropped,
        "encoder_only": encoder_only,
        "written_by": written_by,
        "checked": checked,
        "ignored": ignored,
    }


# ---------------------------------------------------------------- the command


def _parse_set(item: str) -> tuple[str, Any]:
    from xtra.yamlio import read_yaml

    key, sep, value = item.partition("=")
    if not sep or not key.startswith("arch.") or len(key) <= len("arch."):
        raise ParamsError(f"--set {item!r}: expected arch.KEY=VALUE (e.g. arch.width=192)")
    return key[len("arch.") :], read_yaml(value, f"--set {item!r}")


def arch_from_cli(preset: str | None, arch_file: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """The architecture of --preset (a size or a paper model) or --arch-file (YAML), then every --set."""
    from xtra.yamlio import read_yaml

    if preset in MODEL_PRESETS:
        arch = dict(MODEL_PRESETS[preset])
    elif preset in PRESETS:
        arch = {"preset": preset}
    elif arch_file:
        loaded = read_yaml(Path(arch_file).read_text(), arch_file)
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
    parser.add_argument("src", help="the release's .ckpt (Lightning) or mp_rank_00_model_states.pt (DeepSpeed)")
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
    parser.add_argument("--params", default=None, help="take the architecture (and drop_prefixes) from this params")
    parser.add_argument("--model", default=None, help="...and this model of it")
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="PREFIX",
        help="release key prefix to drop (repeatable); a fine-tuned file's classifier.* is dropped without it",
    )


def run(args: argparse.Namespace) -> int:
    drop = list(args.drop)
    if args.params and args.model and not (args.preset or args.arch_file):
        from xtra.config import load_params, model_arch

        params = load_params(args.params, check_paths=False)
        arch = {**model_arch(params, args.model)}
        arch.update(dict(_parse_set(item) for item in args.set))
        drop = [*params["models"][args.model]["drop_prefixes"], *drop]
    else:
        arch = arch_from_cli(args.preset, args.arch_file, args.set)
    convert_official(args.src, args.dst, arch, drop)
    return 0
