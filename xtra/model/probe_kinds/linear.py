"""The linear probe kind: the last block's output (before the final LayerNorm), mean over tokens ->
BatchNorm1d without affine (eps 1e-6) -> Linear. It also probes the pixel floor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xtra.model.probes import FeatureNorm, ProbeKind, register_probe_kind

__all__ = ["LinearProbe", "LINEAR"]


class LinearProbe(nn.Module):
    """mean over tokens of the last block -> BatchNorm1d(affine=False) -> Linear."""

    kind = "linear"

    def __init__(self, dim: int, num_classes: int, norm: bool = True) -> None:
        super().__init__()
        self.bn = FeatureNorm(dim) if norm else nn.Identity()  # a bank normalises once for all heads
        self.linear = nn.Linear(dim, num_classes)  # torch's default init, as the release

    @staticmethod
    def pool(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, N, d), ...] -> (B, d): the last given block, averaged over tokens."""
        return blocks[-1].mean(dim=1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) -> logits (B, C)."""
        return self.linear(self.bn(pooled))


LINEAR = register_probe_kind(
    ProbeKind(
        name="linear",
        blocks=lambda settings: [-1],
        pool=LinearProbe.pool,
        head=lambda dim, num_classes, settings: LinearProbe(dim, num_classes, norm=False),
        pixel_floor=True,
    )
)
