"""Probe kinds and the bank of heads a probe job trains in one pass (METHOD.md, "Probing").

A probe kind (`ProbeKind`) knows which encoder blocks it reads, how it pools their outputs into the
input of its head (parameter-free: the features of a batch are computed once for every head of
every kind, and may be cached), and how to build its head. The kinds are a registry
(`PROBE_KINDS`): each module of `xtra.model.probe_kinds` registers its kind (`linear`, `attentive`),
so a new kind is a new module there (`docs/extending.md`); the probe jobs, their configs, the
stage table and the report look kinds up here, and a benchmark's `kinds` are checked against it.
A kind's settings are `probe.kinds.<kind>` of params (`weight_decays`, `augmentation`, and its own,
e.g. the attentive kind's `num_last_blocks` and `num_heads`).

`HeadBank` holds one head per (lr, weight_decay) setting of a sweep. Every head starts from the
same weights (built under the same seed), as separate runs with that seed would. The BatchNorm of
every head sees the same input and has no parameter, so its statistics are the same in every head:
the bank runs ONE `FeatureNorm` for all heads (exact; for a ViT-H/14 attentive bank it saves H - 1
copies of the (B, N, d) normalised activations) and its heads are built without their own.
Initialisation as the public release's heads: PyTorch's default `nn.Linear` init for every linear
layer (kaiming-uniform weights, uniform bias).

The pixel floor (a model of init `pixels`: one token of normalised pixels) is probed by the kinds
that say so (`ProbeKind.pixel_floor`: the linear kind); `model_kinds` is the one place that decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xtra.errors import ParamsError
from xtra.registry import Registry

__all__ = [
    "BN_EPS",
    "FeatureNorm",
    "ProbeKind",
    "PROBE_KINDS",
    "register_probe_kind",
    "probe_kind",
    "PIXEL_FLOOR_INIT",
    "model_kinds",
    "HeadBank",
]

BN_EPS = 1e-6
PIXEL_FLOOR_INIT = "pixels"  # a model of this init is the pixel floor (xtra.probe.pixels)


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


@dataclass(frozen=True)
class ProbeKind:
    """A registered probe kind: what it reads, how it pools it, how its head is built (see the module doc)."""

    name: str
    # the blocks it reads (0-based, negative from the end) from its settings, e.g. [-1]
    blocks: Callable[[Mapping[str, Any]], list[int]]
    # the outputs (B, N, d) of those blocks -> the head's input: (B, d), or (B, N, d) with keeps_tokens
    pool: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    # (encoder width, classes, settings) -> a head without its own normalisation (the bank normalises)
    head: Callable[[int, int, Mapping[str, Any]], nn.Module]
    keeps_tokens: bool = False  # whether the pooled input keeps the token axis (sizes the feature cache)
    pixel_floor: bool = False  # whether it probes the pixel floor
    # why its settings do not fit an encoder of (width, depth), naming the key; None when they do
    check: Callable[[Mapping[str, Any], int, int], str | None] = lambda settings, width, depth: None


PROBE_KINDS: Registry[ProbeKind] = Registry("probe kind", "xtra.model.probe_kinds")


def register_probe_kind(kind: ProbeKind) -> ProbeKind:
    """Register a probe kind (a module of xtra.model.probe_kinds calls it at its top level)."""
    return PROBE_KINDS.add(kind.name, kind)


def probe_kind(name: str) -> ProbeKind:
    """The registered kind `name`; a ParamsError naming the known kinds otherwise."""
    return PROBE_KINDS[name]


def model_kinds(init: str, kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds of `kinds` a model of `init` is probed with: the pixel floor by the kinds that probe it
    (the linear kind), any other model by all. The one place that decides it (jobs, stage table, report)."""
    return tuple(k for k in kinds if init != PIXEL_FLOOR_INIT or probe_kind(k).pixel_floor)


class HeadBank(nn.Module):
    """One probe head per (lr, weight_decay) setting of one kind (its `options`: the kind's settings,
    `probe.kinds.<kind>`), all fed the same pooled features.

    Weight decay applies to weight matrices and the query, not to biases (`schedule.decay_groups`).
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        num_classes: int,
        settings: Sequence[tuple[float, float]],
        options: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not settings:
            raise ParamsError("empty sweep grid: a head bank needs at least one (lr, weight_decay) setting")
        self.kind = kind
        self.settings = [(float(lr), float(wd)) for lr, wd in settings]
        build = probe_kind(kind).head
        heads = []
        for _ in self.settings:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # every head starts where a standalone run with this seed would
                heads.append(build(dim, num_classes, options or {}))
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
