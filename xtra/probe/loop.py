"""The one-pass sweep: a bank of probe heads trained on the same batches of frozen-encoder features.

Per batch the frozen encoder runs once (or not at all: with `augment` off the training batches are
the same every epoch, so the pooled features are computed once and cached, `CachedFeatures`); the
pooled features feed every head of the `HeadBank`; the summed loss is backpropagated once (heads
share no parameter, so head i receives exactly the gradient of its own loss); each head's gradient
is clipped by its own norm; one AdamW holds a pair of parameter groups per head, whose learning
rates follow each head's own warm-up + cosine schedule, stepped per optimiser step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader

from xtra.errors import ParamsError
from xtra.model.probes import HeadBank, pool_blocks, probe_blocks
from xtra.model.vit import Encoder
from xtra.train.schedule import warmup_cosine

__all__ = [
    "SweepConfig",
    "FeatureSource",
    "LiveFeatures",
    "CachedFeatures",
    "encode_batch",
    "cache_features",
    "train_bank",
    "evaluate_bank",
    "HeadScores",
    "encoded_batches",
    "autocast_for",
    "settings_grid",
]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SweepConfig:
    """Everything the training loop of one (benchmark, kind) sweep depends on."""

    kind: str
    settings: tuple[tuple[float, float], ...]  # (lr, weight_decay) of each head
    epochs: int
    warmup_epochs: float = 0.0
    accum_steps: int = 1
    grad_clip: float = 3.0
    min_lr: float = 1e-5
    warmup_start_factor: float = 0.1
    num_last_blocks: int = 6
    attn_heads: int = 16
    seed: int = 0
    precision: str = "32-true"

    def __post_init__(self) -> None:
        if not self.settings:
            raise ParamsError("empty sweep grid: no (lr, weight_decay) setting to train (probe.benchmarks.*.lrs)")
        if self.epochs < 1 or self.accum_steps < 1:
            raise ParamsError(f"epochs ({self.epochs}) and accum_steps ({self.accum_steps}) must be >= 1")

    @property
    def blocks(self) -> list[int]:
        return probe_blocks(self.kind, self.num_last_blocks)


def autocast_for(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast for "bf16-mixed", else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def encode_batch(encoder: Encoder, images: torch.Tensor, cfg: SweepConfig, device: torch.device) -> torch.Tensor:
    """Images (B, 3, S, S) -> the pooled probe input, float32: (B, d) linear, (B, N, d) attentive."""
    with autocast_for(device, cfg.precision):
        blocks = encoder.forward_features(images.to(device, non_blocking=True), blocks=cfg.blocks)  # [(B, N, d)]
        pooled = pool_blocks(cfg.kind, blocks)
    return pooled.float()


class FeatureSource(Protocol):
    """Training batches of pooled features: `epoch(e)` yields (features, labels); len = batches/epoch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class LiveFeatures:
    """Runs the frozen encoder on every (augmented) batch of a loader; the order follows its sampler."""

    def __init__(self, encoder: Encoder, loader: DataLoader, cfg: SweepConfig, device: torch.device) -> None:
        self.encoder, self.loader, self.cfg, self.device = encoder, loader, cfg, device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for images, labels in self.loader:
            yield encode_batch(self.encoder, images, self.cfg, self.device), labels.to(self.device)


class CachedFeatures:
    """Pooled features computed once; each epoch reshuffles them exactly as `make_loader(seed=seed)` would."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 drop_last: bool = True, device: torch.device | str = "cpu") -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        self.features, self.labels = features, labels  # (n, ...) on CPU or the device
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.drop_last = drop_last and len(labels) >= batch_size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        # the permutation DistributedSampler(seed=seed) draws at this epoch: the same batches as LiveFeatures
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.labels), generator=gen)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield (self.features[idx].to(self.device, non_blocking=True),
                   self.labels[idx].to(self.device, non_blocking=True))


def cache_features(encoder: Encoder, loader: Iterable[Batch], cfg: SweepConfig,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of a whole (unshuffled) loader, kept on the CPU."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(encode_batch(encoder, images, cfg, device).cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)  # (n, ...), (n,)


def _set_lrs(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int, cfg: SweepConfig) -> None:
    for group in optimizer.param_groups:
        base = group["base_lr"]
        group["lr"] = warmup_cosine(step, base, total, warmup, base * cfg.warmup_start_factor, cfg.min_lr)


def train_bank(bank: HeadBank, source: FeatureSource, cfg: SweepConfig, device: torch.device,
               log_every: int = 0) -> list[list[float]]:
    """Train every head of the bank on the source's batches; returns each epoch's mean loss per head."""
    bank.to(device).train()
    optimizer = torch.optim.AdamW(bank.param_groups())
    batches = len(source)
    if batches == 0:
        raise ParamsError("no training batch: the training split is empty")
    steps_per_epoch = math.ceil(batches / cfg.accum_steps)
    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    step, history = 0, []
    for epoch in range(cfg.epochs):
        loss_sum = torch.zeros(len(bank), device=device)
        for i, (feats, labels) in enumerate(source.epoch(epoch)):
            if i % cfg.accum_steps == 0:
                _set_lrs(optimizer, step, total, warmup, cfg)
                group_len = min(cfg.accum_steps, batches - i)  # micro-batches of this optimiser step
            with autocast_for(device, cfg.precision):
                losses = bank.losses(feats, labels)  # (H,)
            (losses.sum() / group_len).backward()
            loss_sum += losses.detach()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == batches:
                bank.clip_(cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        history.append((loss_sum / batches).tolist())
        if log_every and (epoch + 1) % log_every == 0:
            best = min(history[-1])
            print(f"  epoch {epoch + 1}/{cfg.epochs}: loss min {best:.4f} over {len(bank)} heads", flush=True)
    return history


@dataclass
class HeadScores:
    """Top-1 / top-5 (in %) of every head of a bank on one split; top5 is None below 5 classes."""

    top1: list[float]
    top5: list[float | None]
    count: int


@torch.no_grad()
def evaluate_bank(bank: HeadBank, batches: Iterable[Batch], num_classes: int,
                  device: torch.device, precision: str = "32-true") -> HeadScores:
    """Accuracy of every head on (features, labels) batches (BatchNorm in eval mode)."""
    bank.to(device).eval()
    k = 5 if num_classes >= 5 else 1
    correct1 = torch.zeros(len(bank), dtype=torch.long, device=device)
    correct5 = torch.zeros(len(bank), dtype=torch.long, device=device)
    count = 0
    for feats, labels in batches:
        labels = labels.to(device)
        with autocast_for(device, precision):
            logits = bank(feats.to(device))
        for h, out in enumerate(logits):
            top = out.float().topk(k, dim=1).indices  # (B, k)
            hit = top == labels.unsqueeze(1)  # (B, k)
            correct1[h] += hit[:, 0].sum()
            correct5[h] += hit.any(dim=1).sum()
        count += int(labels.numel())
    if count == 0:
        raise ParamsError("the evaluation split is empty")
    top1 = (correct1.double() * 100.0 / count).tolist()
    top5 = (correct5.double() * 100.0 / count).tolist() if num_classes >= 5 else [None] * len(bank)
    return HeadScores(top1=top1, top5=top5, count=count)


def encoded_batches(encoder: Encoder, loader: Iterable[Batch], cfg: SweepConfig,
                    device: torch.device) -> Iterator[Batch]:
    """Stream (pooled features, labels) of an evaluation loader through the frozen encoder."""
    for images, labels in loader:
        yield encode_batch(encoder, images, cfg, device), labels


def settings_grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """Every (lr, weight_decay) pair, weight decay major (lrs vary fastest)."""
    return tuple((float(lr), float(wd)) for wd in weight_decays for lr in lrs)
