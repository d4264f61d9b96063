"""The one-pass sweep: banks of probe heads trained on the same batches of frozen-encoder features.

Per batch the frozen encoder runs once for every kind that shares the batch's transform: one
`forward_features` returns every block any of those kinds reads, and each kind pools its own
(`encode_batch`). With augmentation off the training batches are the same every epoch, so the pooled
features are computed once and cached (`CachedFeatures`). Each kind's `BankTrainer` feeds the pooled
features to every head of its `HeadBank` (one shared normalisation); the summed loss is
backpropagated once (heads share no parameter, so head i receives exactly the gradient of its own
loss); each head's gradient is clipped by its own norm; one AdamW (betas of the config) holds a pair
of parameter groups per head, whose rates follow each head's own schedule, per optimiser step:
`schedule: release` is `release_warmup_cosine` (what the public release trains at), `nominal` the
warm-up + cosine its configs describe (`warmup_cosine`).

Accumulation: `last_group_loss: release` divides every micro-batch loss by `accum_steps`, as the
release (Lightning's accumulation) does, also for a short last group of an epoch; `exact` divides by
the group's real length.

Under torch.distributed (a multi-device job) each rank sees 1/world of every global batch; gradients
are all-reduced (mean over ranks) before clipping, and the bank's normalisation uses the global
batch's statistics, so the job trains as one device would, up to summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from xtra.errors import ParamsError
from xtra.model.probes import HeadBank, probe_kind
from xtra.probe.config import SweepConfig, settings_grid
from xtra.probe.dist import world
from xtra.train.schedule import release_warmup_cosine, warmup_cosine

__all__ = [
    "SweepConfig",
    "FeatureSource",
    "LiveFeatures",
    "CachedFeatures",
    "encode_batch",
    "cache_features",
    "BankTrainer",
    "train_banks",
    "train_bank",
    "evaluate_bank",
    "HeadScores",
    "encoded_batches",
    "autocast_for",
    "settings_grid",
    "lr_at",
]

Features = torch.Tensor | dict[str, torch.Tensor]  # one kind's pooled features, or one per kind
Batch = tuple[Features, torch.Tensor]


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for "bf16-mixed", else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _as_list(cfgs: SweepConfig | Sequence[SweepConfig]) -> list[SweepConfig]:
    return [cfgs] if isinstance(cfgs, SweepConfig) else list(cfgs)


@torch.no_grad()
def encode_batch(
    encoder: torch.nn.Module, images: torch.Tensor, cfgs: SweepConfig | Sequence[SweepConfig], device: torch.device
) -> Features:
    """Images (B, 3, S, S) -> pooled probe inputs, float32: (B, d) linear, (B, N, d) attentive.

    One encoder forward for all the given kinds; a single SweepConfig gives a tensor, several a dict.
    """
    cfg_list = _as_list(cfgs)
    wanted = sorted({b for c in cfg_list for b in c.blocks})  # negative block indices
    with autocast_for(device, cfg_list[0].precision):
        outs = encoder.forward_features(images.to(device, non_blocking=True), blocks=wanted)  # [(B, N, d)]
        by_block = dict(zip(wanted, outs))
        pooled = {c.kind: probe_kind(c.kind).pool([by_block[b] for b in c.blocks]).float() for c in cfg_list}
    return pooled[cfg_list[0].kind] if isinstance(cfgs, SweepConfig) else pooled


class FeatureSource(Protocol):
    """Training batches of pooled features: `epoch(e)` yields (features, labels); len = batches/epoch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class LiveFeatures:
    """Runs the frozen encoder on every (augmented) batch of a loader; the order follows its sampler."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        loader: DataLoader,
        cfgs: SweepConfig | Sequence[SweepConfig],
        device: torch.device,
    ) -> None:
        self.encoder, self.loader, self.cfgs, self.device = encoder, loader, cfgs, device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for images, labels in self.loader:
            yield encode_batch(self.encoder, images, self.cfgs, self.device), labels.to(self.device)


class CachedFeatures:
    """Pooled features computed once; each epoch reshuffles them exactly as `make_loader(seed=seed)` would.

    Under torch.distributed every rank holds the whole cache and takes its DistributedSampler share.
    """

    def __init__(
        self,
        features: Features,
        labels: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        first = next(iter(features.values())) if isinstance(features, dict) else features
        if len(first) != len(labels):
            raise ValueError(f"{len(first)} feature rows but {len(labels)} labels")
        self.features, self.labels = features, labels  # (n, ...) on CPU or the device
        self.seed, self.device = seed, torch.device(device)
        self.rank, self.world = world()
        if batch_size % self.world:
            raise ParamsError(f"batch size {batch_size} is not divisible by the {self.world} devices of the job")
        self.batch_size = batch_size // self.world  # per rank
        self.drop_last = drop_last and len(labels) >= batch_size

    def _per_rank(self) -> int:
        n = len(self.labels)
        return n // self.world if self.drop_last else math.ceil(n / self.world)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _take(self, idx: torch.Tensor) -> Features:
        if isinstance(self.features, dict):
            return {k: v[idx].to(self.device, non_blocking=True) for k, v in self.features.items()}
        return self.features[idx].to(self.device, non_blocking=True)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        # the permutation DistributedSampler(seed=seed) draws at this epoch, and this rank's share of it
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.labels), generator=gen)
        total = self._per_rank() * self.world
        if not self.drop_last:
            order = torch.cat([order, order[: total - len(order)]])  # DistributedSampler's padding
        order = order[:total][self.rank :: self.world]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self._take(idx), self.labels[idx].to(self.device, non_blocking=True)


def cache_features(
    encoder: torch.nn.Module, loader: Iterable, cfgs: SweepConfig | Sequence[SweepConfig], device: torch.device
) -> tuple[Features, torch.Tensor]:
    """Pooled features and labels of a whole (unshuffled) loader, kept on the CPU."""
    feats: list = []
    labels = []
    for images, y in loader:
        out = encode_batch(encoder, images, cfgs, device)
        feats.append({k: v.cpu() for k, v in out.items()} if isinstance(out, dict) else out.cpu())
        labels.append(y.cpu())
    if isinstance(cfgs, SweepConfig):
        return torch.cat(feats), torch.cat(labels)  # (n, ...), (n,)
    return {c.kind: torch.cat([f[c.kind] for f in feats]) for c in cfgs}, torch.cat(labels)


def lr_at(cfg: SweepConfig, base_lr: float, step: int, total: int, warmup: int) -> float:
    """The learning rate of optimiser step `step` for a head whose nominal rate is `base_lr`."""
    rule = release_warmup_cosine if cfg.schedule == "release" else warmup_cosine
    return rule(step, base_lr, total, warmup, base_lr * cfg.warmup_start_factor, cfg.min_lr)


class BankTrainer:
    """One kind's bank, its AdamW and schedule position; fed micro-batch by micro-batch."""

    def __init__(self, bank: HeadBank, cfg: SweepConfig, batches_per_epoch: int, device: torch.device) -> None:
        if batches_per_epoch == 0:
            raise ParamsError("no training batch: the training split is empty")
        self.bank, self.cfg, self.batches, self.device = bank.to(device).train(), cfg, batches_per_epoch, device
        self.optimizer = torch.optim.AdamW(bank.param_groups(), betas=cfg.betas)
        self.steps_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)
        self.total = self.steps_per_epoch * cfg.epochs
        self.warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.step, self.history = 0, []
        self._loss_sum = torch.zeros(len(bank), device=device)
        self._divisor = 1

    def lrs(self, step: int) -> list[float]:
        """Every parameter group's rate at optimiser step `step`."""
        return [lr_at(self.cfg, g["base_lr"], step, self.total, self.warmup) for g in self.optimizer.param_groups]

    def micro_batch(self, i: int, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Micro-batch i of the epoch: loss, backward, and the optimiser step ending its group."""
        accum = self.cfg.accum_steps
        if i % accum == 0:
            for group, lr in zip(self.optimizer.param_groups, self.lrs(self.step)):
                group["lr"] = lr
            exact = min(accum, self.batches - i)  # micro-batches of this optimiser step
            self._divisor = accum if self.cfg.last_group_loss == "release" else exact
        with autocast_for(self.device, self.cfg.precision):
            losses = self.bank.losses(feats, labels)  # (H,)
        (losses.sum() / self._divisor).backward()
        self._loss_sum += losses.detach()
        if (i + 1) % accum == 0 or i + 1 == self.batches:
            self._all_reduce_grads()
            self.bank.clip_(self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    def _all_reduce_grads(self) -> None:
        _, size = world()
        if size == 1:
            return
        for p in self.bank.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(size)

    def end_epoch(self) -> None:
        self.history.append((self._loss_sum / self.batches).tolist())
        self._loss_sum.zero_()

    def state_dict(self) -> dict:
        return {
            "bank": self.bank.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.bank.load_state_dict(state["bank"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state["history"])


def train_banks(
    trainers: Sequence[BankTrainer],
    source: FeatureSource,
    epochs: int,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """Epochs start_epoch..epochs-1 of every trainer on the source's batches (one pass for all).

    `on_epoch_end(e)` runs after epoch e (the job saves its resumable state there).
    """
    for epoch in range(start_epoch, epochs):
        for i, (feats, labels) in enumerate(source.epoch(epoch)):
            for t in trainers:
                t.micro_batch(i, feats[t.cfg.kind] if isinstance(feats, dict) else feats, labels)
        for t in trainers:
            t.end_epoch()
        if on_epoch_end is not None:
            on_epoch_end(epoch)


def train_bank(bank: HeadBank, source: FeatureSource, cfg: SweepConfig, device: torch.device) -> list[list[float]]:
    """Train one bank on the source's batches; returns each epoch's mean loss per head."""
    trainer = BankTrainer(bank, cfg, len(source), device)
    train_banks([trainer], source, cfg.epochs)
    return trainer.history


class HeadScores:
    """Top-1 / top-5 (in %) of every head of a bank on one split; top5 is None below 5 classes."""

    def __init__(self, top1: list[float], top5: list[float | None], count: int) -> None:
        self.top1, self.top5, self.count = top1, top5, count


@torch.no_grad()
def evaluate_bank(
    bank: HeadBank, batches: Iterable[Batch], num_classes: int, device: torch.device, precision: str = "32-true"
) -> HeadScores:
    """Top-1 (and top-5, from 5 classes up) of every head on (features, labels) batches, in %
    (torchmetrics' micro-averaged MulticlassAccuracy; normalisation in eval mode).

    The counts are this process's: a multi-device job evaluates on rank 0 alone while the others wait
    at a barrier, so the metrics never synchronise (torchmetrics would all-gather in `compute` as soon
    as a process group exists, and meet the other ranks' barrier instead)."""
    from torchmetrics.classification import MulticlassAccuracy

    bank.to(device).eval()
    ks = (1, 5) if num_classes >= 5 else (1,)
    metrics = [
        {k: MulticlassAccuracy(num_classes, top_k=k, average="micro", sync_on_compute=False).to(device) for k in ks}
        for _ in range(len(bank))
    ]
    count = 0
    for feats, labels in batches:
        feats = feats[bank.kind] if isinstance(feats, dict) else feats
        labels = labels.to(device)
        with autocast_for(device, precision):
            logits = bank(feats.to(device))
        for head, out in zip(metrics, logits):
            for metric in head.values():
                metric.update(out.float(), labels)  # (B, C) logits, (B,) labels
        count += int(labels.numel())
    if count == 0:
        raise ParamsError("the evaluation split is empty")

    def percent(metric: MulticlassAccuracy) -> float:
        return round(float(metric.compute()) * 100.0, 4)

    top1 = [percent(head[1]) for head in metrics]
    top5 = [percent(head[5]) if 5 in head else None for head in metrics]
    return HeadScores(top1=top1, top5=top5, count=count)


def encoded_batches(
    encoder: torch.nn.Module, loader: Iterable, cfgs: SweepConfig | Sequence[SweepConfig], device: torch.device
) -> Iterator[Batch]:
    """Stream (pooled features, labels) of an evaluation loader through the frozen encoder."""
    for images, labels in loader:
        yield encode_batch(encoder, images, cfgs, device), labels
