"""Probe heads on a frozen encoder (METHOD.md, "Probing"), and a bank of heads trained in one pass.

- `LinearProbe`: last block's output (before the final LayerNorm), mean over tokens ->
  BatchNorm1d without affine (eps 1e-6) -> Linear.
- `AttentiveProbe`: mean of the last `num_last_blocks` blocks' outputs (B, N, d) -> BatchNorm over
  channels without affine -> attention pooling with one learned query (no query projection, key
  and value projections without bias, scale head_dim^-0.5) -> Linear.
- Initialisation as the public release's heads: PyTorch's default `nn.Linear` init for every linear
  layer (kaiming-uniform weights, uniform bias), the attention query normal(0, 0.02).

Each probe splits into a parameter-free `pool(blocks)` (what the frozen backbone feeds it, so the
features of a batch are computed once for every head, and may be cached) and `forward(pooled)`.

`HeadBank` holds one head per (lr, weight_decay) setting of a sweep. Every head starts from the
same weights (built under the same seed), as separate runs with that seed would. The BatchNorm of
every head sees the same input and has no parameter, so its statistics are the same in every head:
the bank runs ONE `FeatureNorm` for all heads (exact; for a ViT-H/14 attentive bank it saves H - 1
copies of the (B, N, d) normalised activations) and its heads are built without their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xtra.errors import ParamsError

__all__ = [
    "PROBE_KINDS",
    "BN_EPS",
    "QUERY_INIT_STD",
    "FeatureNorm",
    "LinearProbe",
    "AttentiveProbe",
    "probe_blocks",
    "pool_blocks",
    "make_probe",
    "PIXEL_FLOOR_INIT",
    "model_kinds",
    "HeadBank",
]

PROBE_KINDS = ("linear", "attentive")
BN_EPS = 1e-6
QUERY_INIT_STD = 0.02  # the release's `nn.init.normal_(query, std=0.02)`; linear layers keep torch's default


class FeatureNorm(nn.Module):
    """BatchNorm1d(affine=False, eps 1e-6) over the last dimension, optionally synchronised over ranks.

    (B, d) or (B, N, d) -> same shape; (B, N, d) is normalised with statistics over batch and tokens.
    One process: `F.batch_norm`, bit for bit what `nn.BatchNorm1d` computes. Under torch.distributed
    (`sync=True` and an initialised process group), the batch statistics are those of the global
    batch (sums all-reduced), so a multi-device job normalises as one device would, up to summation
    order. The input is a frozen encoder's output: nothing is back-propagated through it.
    """

    def __init__(self, dim: int, eps: float = BN_EPS, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum, self.sync = eps, momentum, True
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (B*N, d)
        distributed = (
            self.sync
            and self.training
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        if distributed:
            out = self._global_batch_norm(flat)
        else:
            out = F.batch_norm(
                flat, self.running_mean, self.running_var, training=self.training, momentum=self.momentum, eps=self.eps
            )
            if self.training:
                self.num_batches_tracked += 1
        return out.reshape(x.shape)

    @torch.no_grad()
    def _global_batch_norm(self, flat: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        stats = torch.cat([flat.sum(0), torch.tensor([float(len(flat))], device=flat.device)]).double()
        dist.all_reduce(stats)
        count = stats[-1]
        mean = (stats[:-1] / count).to(flat.dtype)  # (d,)
        sq = ((flat - mean) ** 2).sum(0).double()
        dist.all_reduce(sq)
        var = (sq / count).to(flat.dtype)  # biased: what the batch is normalised with
        self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
        self.running_var.mul_(1 - self.momentum).add_((sq / (count - 1)).to(flat.dtype), alpha=self.momentum)
        self.num_batches_tracked += 1
        return (flat - mean) / torch.sqrt(var + self.eps)


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


class AttentiveProbe(nn.Module):
    """mean of the last blocks -> BatchNorm over channels -> one-query attention pooling -> Linear."""

    kind = "attentive"

    def __init__(self, dim: int, num_classes: int, num_heads: int = 16, norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ParamsError(f"probe.attn_heads: {num_heads} heads do not divide the encoder width {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.bn = FeatureNorm(dim) if norm else nn.Identity()  # a bank normalises once for all heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)  # torch's default init, as the release
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.query, std=QUERY_INIT_STD)

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
        x = self.bn(pooled)  # per-channel statistics over batch and tokens
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


def make_probe(kind: str, dim: int, num_classes: int, attn_heads: int = 16, norm: bool = True) -> nn.Module:
    """A fresh probe head of the given kind (initialised from the current torch RNG)."""
    if kind == "linear":
        return LinearProbe(dim, num_classes, norm)
    if kind == "attentive":
        return AttentiveProbe(dim, num_classes, attn_heads, norm)
    raise ParamsError(f"unknown probe kind {kind!r}; expected one of {list(PROBE_KINDS)}")


PIXEL_FLOOR_INIT = "pixels"  # a model of this init is the pixel floor (xtra.probe.pixels)


def model_kinds(init: str, kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds of `kinds` a model of `init` is probed with: the pixel floor (one token of pixels)
    by the linear kind only. The one place that decides it (jobs, stage table, report)."""
    return tuple(k for k in kinds if init != PIXEL_FLOOR_INIT or k == "linear")


class HeadBank(nn.Module):
    """One probe head per (lr, weight_decay) setting, all fed the same pooled features.

    Weight decay applies to weight matrices and the query, not to biases (`schedule.decay_groups`).
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        num_classes: int,
        settings: Sequence[tuple[float, float]],
        attn_heads: int = 16,
        seed: int = 0,
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
                heads.append(make_probe(kind, dim, num_classes, attn_heads, norm=False))
        self.norm = FeatureNorm(dim)  # shared by every head: the same input, no parameter
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features (B, d) or (B, N, d) -> one logits tensor (B, C) per head."""
        normed = self.norm(pooled)  # computed once for the bank
        return [head(normed) for head in self.heads]

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
        return [
            torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.grad is not None], max_norm)
            for head in self.heads
        ]
