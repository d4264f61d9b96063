"""The pixel floor: a "model" whose features are the flattened, normalised pixels of the image.

`write_pixels_model(name, arch, out_dir)` writes its `model.pt` (init "pixels", an empty
state_dict, the arch section with img_size) and `metrics.json`; nothing is trained and no dataset
is read. `PixelEncoder` is what probing runs in place of an encoder: the evaluation-resized image
(3, S, S), normalised with the ImageNet mean/std like every model's input, flattened to one token
of width 3*S*S, so the linear probe (mean over tokens -> BatchNorm -> Linear) is a linear classifier
of the normalised pixels under the same protocol, splits and selection as the models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtra.atomic import write_json_atomic
from xtra.model.artifact import ARTIFACT_NAME, save_model_artifact

__all__ = ["PixelEncoder", "write_pixels_model"]


class PixelEncoder(nn.Module):
    """(B, 3, S, S) -> one token (B, 1, 3*S*S) for every block asked: the pixels as features."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.width = 3 * img_size * img_size
        self.depth = 1
        self.blocks = nn.ModuleList([nn.Identity()])  # one "block": the pixels

    def forward_features(self, images: torch.Tensor, blocks: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        flat = images.flatten(1).unsqueeze(1)  # (B, 1, 3*S*S)
        return [flat for _ in blocks]


def write_pixels_model(name: str, arch: Mapping[str, Any], out_dir: str | Path, identity: str | None = None) -> Path:
    """Write models/<name>/model.pt and metrics.json of a pixel-floor model of `arch` (its params
    section), both carrying `identity` (the pretrain stage's, `xtra.identity`); returns model.pt's path."""
    out = Path(out_dir)
    arch = dict(arch)
    path = out / ARTIFACT_NAME
    save_model_artifact(
        path,
        init="pixels",
        arch=arch,
        state_dict={},
        provenance={"model": name, "features": f"3x{arch['img_size']}x{arch['img_size']} pixels", "identity": identity},
    )
    metrics = {"identity": identity, "model": name, "init": "pixels", "images_seen": 0, "steps": 0}
    write_json_atomic(out / "metrics.json", metrics, indent=1)
    return path
