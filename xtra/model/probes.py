"""Probe heads on a frozen encoder (METHOD.md, "Probing"), and a bank of heads trained in one pass.

- `LinearProbe`: last block's output (before the final LayerNorm), mean over tokens ->
  BatchNorm1d without affine (eps 1e-6) -> Linear.
- `AttentiveProbe`: mean of the last `num_last_blocks` blocks' outputs (B, N, d) -> BatchNorm over
  channels without affine -> attention pooling with one learned query (no query projection, key
  and value projections without bias, scale head_dim^-0.5) -> Linear.

Each probe splits into a parameter-free `pool(blocks)` (what the frozen backbone feeds it, so the
features of a batch are computed once for every head, and may be cached) and `forward(pooled)`.

`HeadBank` holds one head per (lr, weight_decay) setting of a sweep. Every head starts from the
same weights (built under the same seed), as separate runs with that seed would; heads share no
parameter or statistic, so one head of the bank trains exactly as a standalone probe would.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xtra.errors import ParamsError

__all__ = ["PROBE_KINDS", "BN_EPS", "LinearProbe", "AttentiveProbe", "probe_blocks", "pool_blocks", "make_probe",
           "HeadBank"]

PROBE_KINDS = ("linear", "attentive")
BN_EPS = 1e-6
INIT_STD = 0.02


def _init_linear(layer: nn.Linear) -> None:
    nn.init.trunc_normal_(layer.weight, std=INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class LinearProbe(nn.Module):
    """mean over tokens of the last block -> BatchNorm1d(affine=False) -> Linear."""

    kind = "linear"

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.linear = nn.Linear(dim, num_classes)
        _init_linear(self.linear)

    @staticmethod
    def pool(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, N, d), ...] -> (B, d): the last given block, averaged over tokens."""
        return blocks[-1].mean(dim=1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) -> logits (B, C)."""
        return self.linear(self.bn(pooled))


class AttentiveProbe(nn.Module):
    """mean of the last blocks -> BatchNorm over channels -> one-query attention pooling -> Linear."""

    kind = "attentive"

    def __init__(self, dim: int, num_classes: int, num_heads: int = 16) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ParamsError(f"probe.attn_heads: {num_heads} heads do not divide the encoder width {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=INIT_STD)
        for layer in (self.k, self.v, self.linear):
            _init_linear(layer)

    @staticmethod
    def pool(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, N, d)] * n -> (B, N, d): the mean of the given blocks' outputs."""
        return torch.stack(list(blocks), dim=0).mean(dim=0)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N, d) -> pooled (B, d) by the learned query.

        Computed as softmax_n(q_h . (W_k x_n)_h * scale) weighting (W_v x_n)_h, re-associated so that
        no (B, N, d) projection is formed: the query is mapped into token space once
        (u_h = W_k,h^T q_h) and W_v is applied after pooling. Same function and gradients, about N
        times fewer operations than projecting every token.
        """
        b, n, d = x.shape
        h = self.num_heads
        w_k = self.k.weight.reshape(h, d // h, d)  # (h, d/h, d): the rows of each head
        w_v = self.v.weight.reshape(h, d // h, d)
        u = torch.einsum("hcd,hc->hd", w_k, self.query.reshape(h, d // h))  # (h, d)
        attn = (torch.einsum("bnd,hd->bhn", x, u) * self.scale).softmax(dim=-1)  # (B, h, N)
        pooled = torch.einsum("bhn,bnd->bhd", attn, x)  # (B, h, d)
        return torch.einsum("bhd,hcd->bhc", pooled, w_v).reshape(b, d)  # (B, d)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> logits (B, C)."""
        b, n, d = pooled.shape
        x = self.bn(pooled.reshape(b * n, d)).reshape(b, n, d)  # per-channel statistics over batch and tokens
        return self.linear(self.attend(x))


def probe_blocks(kind: str, num_last_blocks: int = 6) -> list[int]:
    """The encoder blocks a probe kind reads (negative: from the end)."""
    if kind == "linear":
        return [-1]
    if kind == "attentive":
        return list(range(-num_last_blocks, 0))
    raise ParamsError(f"unknown probe kind {kind!r}; expected one of {list(PROBE_KINDS)}")


def pool_blocks(kind: str, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The probe input of a kind from the blocks `probe_blocks(kind)` returned: (B, d) or (B, N, d)."""
    if kind == "linear":
        return LinearProbe.pool(blocks)
    if kind == "attentive":
        return AttentiveProbe.pool(blocks)
    raise ParamsError(f"unknown probe kind {kind!r}; expected one of {list(PROBE_KINDS)}")


def make_probe(kind: str, dim: int, num_classes: int, attn_heads: int = 16) -> nn.Module:
    """A fresh probe head of the given kind (initialised from the current torch RNG)."""
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    if kind == "attentive":
        return AttentiveProbe(dim, num_classes, attn_heads)
    raise ParamsError(f"unknown probe kind {kind!r}; expected one of {list(PROBE_KINDS)}")


class HeadBank(nn.Module):
    """One probe head per (lr, weight_decay) setting, all fed the same pooled features.

    Weight decay applies to weight matrices and the query, not to biases (`schedule.decay_groups`).
    """

    def __init__(
        self, kind: str, dim: int, num_classes: int, settings: Sequence[tuple[float, float]],
        attn_heads: int = 16, seed: int = 0,
    ) -> None:
        super().__init__()
        if not settings:
            raise ParamsError("empty sweep grid: a head bank needs at least one (lr, weight_decay) setting")
        self.kind = kind
        self.settings = [(float(lr), float(wd)) for lr, wd in settings]
        heads = []
        for _ in self.settings:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # every head starts where a standalone run with this seed would
                heads.append(make_probe(kind, dim, num_classes, attn_heads))
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features -> one logits tensor (B, C) per head."""
        return [head(pooled) for head in self.heads]

    def losses(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(H,) cross-entropy of every head on the batch (float32)."""
        return torch.stack([F.cross_entropy(logits.float(), labels) for logits in self(pooled)])

    def param_groups(self) -> list[dict]:
        """AdamW groups, two per head (weights with the head's decay; biases without), tagged with the head."""
        from xtra.train.schedule import decay_groups

        groups: list[dict] = []
        for i, (head, (lr, wd)) in enumerate(zip(self.heads, self.settings)):
            for group in decay_groups(head, wd):
                if group["params"]:
                    groups.append({**group, "lr": lr, "base_lr": lr, "head": i})
        return groups

    def clip_(self, max_norm: float) -> list[torch.Tensor]:
        """Clip each head's gradients by its own norm (as separate runs would); returns the norms.

        `max_norm` 0 disables clipping (and returns no norms).
        """
        if max_norm <= 0:
            return []
        return [torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.grad is not None], max_norm)
                for head in self.heads]
