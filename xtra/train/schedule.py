"""Learning-rate schedules, a pre-training's step counts and AdamW parameter groups (pre-training and probing)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from xtra.train.config import TrainConfig

__all__ = [
    "warmup_cosine",
    "release_warmup_cosine",
    "batches_per_epoch",
    "steps_per_epoch",
    "schedule_steps",
    "decay_groups",
]


def warmup_cosine(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, warmup_start_lr: float, min_lr: float
) -> float:
    """Linear warm-up from `warmup_start_lr` to `base_lr` over `warmup_steps`, then cosine to `min_lr`.

    Stepped per optimiser step; at `total_steps` (and after) the rate is `min_lr`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def release_warmup_cosine(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, warmup_start_lr: float, min_lr: float
) -> float:
    """The rate the public release actually trains at, as a closed form (stepped per optimiser step).

    The release steps lightning-bolts' `LinearWarmupCosineAnnealingLR` (its recursive, chainable
    form) once per optimiser step. Run for real, that scheduler does the following:
    - with a warm-up of w >= 1 steps, step t < w runs at `warmup_start_lr + t * (base - start) / max(1, w - 1)`:
      the warm-up reaches `base_lr` at step w - 1, and step w runs at `base_lr` again (the peak is held
      for two steps); from there a cosine to `min_lr` over the remaining `total_steps - w` steps;
    - with no warm-up (w = 0) step 0 runs at `warmup_start_lr` and every later step multiplies the
      distance to `min_lr` by the cosine's ratio, so the rate decays by a cosine *from
      warmup_start_lr*, never reaching `base_lr` (the release's transfer probes set w = 0 and a start of
      lr/10: they train at an effective lr/10).
    At `total_steps` (and after) the rate is `min_lr`.
    """
    if warmup_steps <= 0:
        peak, span, t = warmup_start_lr, max(1, total_steps), step
    else:
        if step < warmup_steps:
            return warmup_start_lr + step * (base_lr - warmup_start_lr) / max(1, warmup_steps - 1)
        peak, span, t = base_lr, max(1, total_steps - warmup_steps), step - warmup_steps
    progress = min(1.0, t / span)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches each rank trains on per epoch (drop_last: the remainder samples wait for the next epoch)."""
    return (num_samples // world_size) // batch_size


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulate: int) -> int:
    """Optimiser steps per epoch, rounded up: Lightning steps on an epoch's last, partial accumulation."""
    return max(1, -(-batches_per_epoch(num_samples, batch_size, world_size) // accumulate))


def schedule_steps(train: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, total optimiser steps) of a pre-training: epochs x steps per epoch, capped by max_steps."""
    total = train.epochs * steps_per_epoch
    if train.max_steps >= 0:
        total = min(total, train.max_steps)
    return int(round(train.warmup_epochs * steps_per_epoch)), total


def decay_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on biases and norm weights.

    A parameter of one dimension is a bias or a LayerNorm/BatchNorm weight (METHOD.md: "none on
    biases and norm weights"); every other parameter decays. Each group keeps the order of `params`
    (a module: its `parameters()`), which is the order a gradient clip sums their norms in.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    decay, no_decay = [], []
    for param in params:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
