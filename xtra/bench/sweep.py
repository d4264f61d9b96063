"""Benchmark of the one-pass sweep: K learning rates x both kinds in one pass vs the separate runs.

Both sides see the same random images, batches and epochs and recompute the frozen encoder on every
batch (the augmented setting). Rows: per kind, its K heads in one pass vs K single-head runs; and
`both`, the 2K heads of both kinds fed by ONE encoder forward per batch (what a probe job does)
vs the 2K separate single-head runs the release's one-job-per-lr layout makes. The ratio approaches
the number of heads replaced when the encoder dominates a head's cost; `xtra bench sweep` prints it
with the goal (0.8 x heads) beside it. Nothing here asserts a timing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from xtra.model.probes import HeadBank
from xtra.model.vit import Encoder
from xtra.probe.loop import BankTrainer, LiveFeatures, SweepConfig, settings_grid, train_banks

__all__ = ["SweepBenchSetup", "SweepBenchRow", "run_sweep_bench", "format_bench", "DEFAULT_LRS"]

DEFAULT_LRS = (1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3, 8e-3, 1e-2)


@dataclass
class SweepBenchRow:
    kind: str
    heads: int
    one_pass_s: float
    separate_s: float

    @property
    def speedup(self) -> float:
        return self.separate_s / self.one_pass_s


def _loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)


def _timed_run(
    encoder: Encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfgs: Sequence[SweepConfig],
    batch_size: int,
    num_classes: int,
    device: torch.device,
) -> float:
    """Wall time of training the banks of `cfgs` together: one encoder forward per batch for all."""
    source = LiveFeatures(encoder, _loader(images, labels, batch_size, cfgs[0].seed), list(cfgs), device)
    trainers = [
        BankTrainer(HeadBank(c.kind, encoder.width, num_classes, c.settings, c.options, c.seed), c, len(source), device)
        for c in cfgs
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    train_banks(trainers, source, cfgs[0].epochs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class SweepBenchSetup:
    """The synthetic workload: random images through a frozen encoder, heads on random labels."""

    lrs: tuple[float, ...] = DEFAULT_LRS
    kinds: tuple[str, ...] = ("linear", "attentive")
    epochs: int = 2
    num_samples: int = 512
    batch_size: int = 64
    img_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 12
    num_heads: int = 3  # the encoder's attention heads
    num_classes: int = 10
    num_last_blocks: int = 6  # the attentive kind's settings
    probe_num_heads: int = 4
    seed: int = 0


def run_sweep_bench(
    setup: SweepBenchSetup | None = None,
    device: str | None = None,
    verbose: bool = True,
    num_threads: int | None = None,
    **overrides: Any,
) -> list[SweepBenchRow]:
    """Wall time of a K-head sweep in one pass vs K single-head runs (K = len(lrs)), per probe kind.

    `overrides` replace fields of `setup` (e.g. `lrs=[...]`, `epochs=1`). `num_threads` sets torch's
    intra-op threads for the run, then restores them (on a small, busy CPU one thread is steadiest).
    """
    setup = replace(setup or SweepBenchSetup(), **overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        rows = _bench(setup, dev)
    finally:
        torch.set_num_threads(before)
    if verbose:
        print(
            format_bench(
                rows,
                f"{setup.num_samples} images of {setup.img_size}px, {setup.epochs} epoch(s), "
                f"encoder width {setup.width} depth {setup.depth}, {dev}, "
                f"{torch.get_num_threads() if not num_threads else num_threads} thread(s)",
            )
        )
    return rows


def _bench(s: SweepBenchSetup, dev: torch.device) -> list[SweepBenchRow]:
    torch.manual_seed(s.seed)
    encoder = Encoder(s.img_size, s.patch_size, s.width, s.depth, s.num_heads, block_size=1)
    encoder = encoder.to(dev).eval().requires_grad_(False)
    images = torch.randn(s.num_samples, 3, s.img_size, s.img_size)  # (n, 3, S, S)
    labels = torch.randint(0, s.num_classes, (s.num_samples,))
    rows = []
    cfgs = [
        SweepConfig(
            kind=kind,
            settings=settings_grid(s.lrs, [0.0]),
            epochs=s.epochs,
            seed=s.seed,
            options={"num_last_blocks": min(s.num_last_blocks, s.depth), "num_heads": s.probe_num_heads}
            if kind == "attentive"
            else {},
        )
        for kind in s.kinds
    ]
    warm = images[: s.batch_size], labels[: s.batch_size]
    _timed_run(encoder, *warm, cfgs, s.batch_size, s.num_classes, dev)  # warm-up (allocator, kernels)
    for cfg in cfgs:
        one_pass = _timed_run(encoder, images, labels, [cfg], s.batch_size, s.num_classes, dev)
        separate = 0.0
        for setting in cfg.settings:
            single = replace(cfg, settings=(setting,))
            separate += _timed_run(encoder, images, labels, [single], s.batch_size, s.num_classes, dev)
        rows.append(SweepBenchRow(cfg.kind, len(cfg.settings), one_pass, separate))
    if len(cfgs) > 1:  # every kind in one pass, against all the separate runs measured above
        together = _timed_run(encoder, images, labels, cfgs, s.batch_size, s.num_classes, dev)
        rows.append(
            SweepBenchRow("+".join(s.kinds), sum(r.heads for r in rows), together, sum(r.separate_s for r in rows))
        )
    return rows


def format_bench(rows: Sequence[SweepBenchRow], title: str = "") -> str:
    """A plain-text table of the benchmark rows."""
    lines = [
        f"probe sweep: one pass vs separate runs{f' ({title})' if title else ''}",
        f"{'kinds':<17} {'heads':>5} {'one pass s':>11} {'separate s':>11} {'ratio':>8} {'goal 0.8xheads':>15}",
    ]
    for r in rows:
        lines.append(
            f"{r.kind:<17} {r.heads:>5} {r.one_pass_s:>11.2f} {r.separate_s:>11.2f} {r.speedup:>7.2f}x "
            f"{0.8 * r.heads:>14.1f}x"
        )
    return "\n".join(lines)
