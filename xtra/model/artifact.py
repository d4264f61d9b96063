"""The final model of a `pretrain` stage: `models/<model>/model.pt`, a weights-only file.

It holds plain data only (tensors, strings, numbers, lists, dicts), so every reader loads it with
`torch.load(weights_only=True, mmap=True)`: no unpickling of arbitrary objects, and a probe job of a
ViT-H/14 maps the 2.5 GB of weights instead of reading a 10 GB training checkpoint with its AdamW
state. Layout:

    {"format": "xtra-model", "version": 1,
     "init": "pretrain" | "random" | "official" | "pixels",
     "arch": {...the model's arch section...},
     "state_dict": {"encoder.*": tensor, ...},   # XTRA's keys; encoder-only files hold encoder.* alone
     "provenance": {...}}                          # identity, steps, images_seen, source file, ...

`provenance["identity"]` is the model's identity (`xtra.identity`: what probe results are keyed on);
`artifact_identity` reads it (a file written without one, by hand or by older code, is identified by its
bytes' sha256).

A file written before the renames of one word per concept (arch `heads` / `predictor_heads`, the
pixel heads' tensors `heads.*`) is read with the new names (`num_heads`, `predictor_num_heads`,
`pixel_heads.*`): `read_model_artifact` is the one place that translates it.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xtra.atomic import save_torch_atomic, sha256_file
from xtra.config import RENAMED_KEYS
from xtra.errors import CheckpointError

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_NAME",
    "ModelArtifact",
    "save_model_artifact",
    "read_model_artifact",
    "artifact_identity",
]

ARTIFACT_FORMAT = "xtra-model"
ARTIFACT_VERSION = 1
ARTIFACT_NAME = "model.pt"  # models/<model>/model.pt
STATE_RENAMES = {"heads.": "pixel_heads."}  # tensor-name prefixes of a file written before the rename


@dataclass
class ModelArtifact:
    init: str
    arch: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_only(self) -> bool:
        """True when the file holds the encoder alone (a converted fine-tuned release file)."""
        return bool(self.state_dict) and all(k.startswith("encoder.") for k in self.state_dict)


def save_model_artifact(
    path: str | Path,
    *,
    init: str,
    arch: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write the weights-only final model atomically (temporary file beside `path`, then rename)."""
    payload = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "init": str(init),
        "arch": dict(arch),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "provenance": dict(provenance or {}),
    }
    save_torch_atomic(payload, path)  # streamed to the file: no second copy of the weights in memory


def read_model_artifact(path: str | Path) -> ModelArtifact:
    """Load a final model file with `weights_only=True, mmap=True`; a wrong file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist (run `xtra pretrain {path.parent.name}`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"model file {path} cannot be read as a weights-only file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise CheckpointError(
            f"{path} is not an xtra model file (format {ARTIFACT_FORMAT!r}); "
            "a training checkpoint is converted with `xtra convert-checkpoint`"
        )
    if payload.get("version") != ARTIFACT_VERSION:
        raise CheckpointError(
            f"{path}: model file version {payload.get('version')!r}, this code reads {ARTIFACT_VERSION}"
        )
    for key in ("init", "arch", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: model file lacks {key!r}")
    arch_renames = RENAMED_KEYS["models.*.arch"]  # the params' rename table: old arch key -> new
    state = {}
    for key, tensor in payload["state_dict"].items():
        old = next((p for p in STATE_RENAMES if key.startswith(p)), None)
        state[STATE_RENAMES[old] + key[len(old) :] if old else key] = tensor
    return ModelArtifact(
        init=payload["init"],
        arch={arch_renames.get(k, k): v for k, v in payload["arch"].items()},
        state_dict=state,
        provenance=dict(payload.get("provenance") or {}),
    )


def artifact_identity(path: str | Path) -> str:
    """The identity of the model in `path` (its provenance's `identity`; else `sha256:<the file's sha256>`)."""
    identity = read_model_artifact(path).provenance.get("identity")
    return str(identity) if identity else f"sha256:{sha256_file(path)}"
