"""Benchmark of online probes (`xtra.train.online`): what they add to a pre-training step, measured, and in
FLOPs at the paper's sizes.

Measured: a model of params (the demo's `xtra_k2` by default) trains on fixed random batches of its size;
one step is the pre-training step (forward, loss, backward, gradient clip, AdamW step) alone, or followed
by the online heads' work as the callback does it: the block outputs kept by `FeatureTap` during the
forward (raster order) or one extra raster-order forward (`--extra-forward`: pseudo-random order, another
labelled set), pooled, and every head of every kind trained one step (`OnlineBankTrainer`). Rounds of both
alternate (the machine's load drifts), and the median step time of each is compared. An evaluation's time
(held-out images through the encoder and every head) is measured too and spread over `val_every_n_steps`.

FLOPs: `xtra.model.flops.online_probe_flops_per_image` against `train_flops_per_image` for XTRA-B/16 and
H/14 (ImageNet-1k's 1,000 classes), reusing the training forward or with the extra forward.
Nothing here asserts a timing.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.flops import online_probe_flops_per_image, train_flops_per_image
from xtra.model.probes import HeadBank, probe_kind
from xtra.model.xtra import XTRA
from xtra.probe.config import SweepConfig, kind_settings, settings_grid
from xtra.probe.loop import encode_batch
from xtra.train.online import FeatureTap, OnlineBankTrainer
from xtra.train.schedule import decay_groups

__all__ = ["run_online_bench", "flops_rows"]


def flops_rows(kinds: tuple[str, ...], heads_per_kind: int) -> list[dict[str, Any]]:
    """Online-probe FLOPs per training image against the training step's, at B/16 and H/14 (1,000 classes)."""
    rows = []
    options = {k: kind_settings(k) for k in kinds}
    for name in ("xtra_b16", "xtra_h14"):
        cfg = ArchConfig(**MODEL_PRESETS[name])
        train = train_flops_per_image(cfg)
        for extra in (False, True):
            added = online_probe_flops_per_image(cfg, options, 1000, heads_per_kind, extra)
            rows.append({"model": name, "extra_forward": extra, "train_gflops": train / 1e9, "ratio": added / train})
    return rows


def run_online_bench(
    arch: dict[str, Any],
    batch_size: int,
    kinds: tuple[str, ...] = ("linear",),
    kind_params: dict[str, Any] | None = None,
    lrs: tuple[float, ...] = (1e-3,),
    steps: int = 10,
    rounds: int = 5,
    eval_images: int = 1000,
    val_every: int = 50,
    extra_forward: bool = False,
    num_classes: int = 10,
    threads: int | None = None,
) -> dict[str, float]:
    """Median step time without and with online heads, their overhead, and an evaluation's time (printed).
    `kind_params`: params' `probe.kinds` (each kind's settings, e.g. attentive's num_last_blocks)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = XTRA(ArchConfig.from_dict(arch))
    optimizer = torch.optim.AdamW(decay_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    size = model.cfg.img_size
    batches = [(torch.randn(batch_size, 3, size, size), torch.randint(0, num_classes, (batch_size,))) for _ in range(4)]
    encoder, depth = model.encoder, len(model.encoder.blocks)
    sweeps = [
        SweepConfig(
            kind=k, settings=settings_grid(lrs, [0.0]), epochs=1, options=kind_settings(k, (kind_params or {}).get(k))
        )
        for k in kinds
    ]
    trainers = [
        OnlineBankTrainer(HeadBank(s.kind, encoder.width, num_classes, s.settings, s.options), s, device)
        for s in sweeps
    ]
    wanted = sorted({b + depth for s in sweeps for b in s.blocks})
    tap = FeatureTap(encoder.blocks, wanted)

    def step(i: int, online: bool) -> None:
        images, labels = batches[i % len(batches)]
        tap.armed = online and not extra_forward
        loss = model.loss(images, step=i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not online:
            return
        if extra_forward:
            encoder.eval()
            features = encode_batch(encoder, images, sweeps, device)
            encoder.train()
        else:
            kept = tap.take()
            features = {s.kind: probe_kind(s.kind).pool([kept[b + depth] for b in s.blocks]).float() for s in sweeps}
        for trainer in trainers:
            trainer.train_on(features[trainer.cfg.kind], labels, 1.0)

    def timed(online: bool) -> float:
        start = time.perf_counter()
        for i in range(steps):
            step(i, online)
        return (time.perf_counter() - start) / steps

    step(0, True)  # warm-up of both paths
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for online in (False, True):
            times[online].append(timed(online))
    held_out = torch.randn(eval_images, 3, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        encoder.eval()
        for first in range(0, eval_images, batch_size):
            features = encode_batch(encoder, held_out[first : first + batch_size], sweeps, device)
            for trainer in trainers:
                trainer.bank.eval()(features[trainer.cfg.kind])
    evaluation = time.perf_counter() - start
    off, on = statistics.median(times[False]), statistics.median(times[True])
    result = {
        "step_s": off,
        "online_step_s": on,
        "overhead": (on - off) / off,
        "eval_s": evaluation,
        "eval_per_step": evaluation / val_every / off,
    }
    feed = "one extra raster forward" if extra_forward else "the training forward's features"
    print(
        f"online probes {list(kinds)} x {len(lrs)} lr(s), fed {feed}; batch {batch_size}, {steps} steps x {rounds} "
        f"rounds each, alternating, {torch.get_num_threads()} thread(s)\n"
        f"  step without: {off * 1e3:.1f} ms (median of rounds {', '.join(f'{t * 1e3:.0f}' for t in times[False])})\n"
        f"  step with:    {on * 1e3:.1f} ms (median of rounds {', '.join(f'{t * 1e3:.0f}' for t in times[True])})\n"
        f"  overhead:     {100 * result['overhead']:+.2f} % of the step\n"
        f"  evaluation:   {evaluation:.2f} s for {eval_images} held-out images = "
        f"{100 * result['eval_per_step']:.2f} % of a step over {val_every} steps"
    )
    print(f"FLOPs online probes add to a training image (1,000 classes, {len(lrs)} head(s) per kind):")
    for row in flops_rows(kinds, len(lrs)):
        how = "extra raster forward" if row["extra_forward"] else "reusing the training forward"
        print(f"  {row['model']}: {100 * row['ratio']:.4f} % of {row['train_gflops']:.0f} GFLOPs ({how})")
    tap.remove()
    return result
