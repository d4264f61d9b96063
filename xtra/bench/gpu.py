"""`xtra bench gpu`: the paper's two models (XTRA-B/16, XTRA-H/14) in training on one GPU.

Three recipes: bf16 with dense-mask SDPA, bf16 with compiled FlexAttention, and the release's fp16
recipe (fp16 autocast + loss scaling, the predictor in fp32), as ratios to the first, with the
model-FLOPs utilisation against the device's dense bf16 peak (`xtra.model.flops.PEAK_TFLOPS`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.flops import peak_flops_per_s, peak_memory_mb, train_flops_per_image
from xtra.model.mask import flex_available
from xtra.model.xtra import XTRA

__all__ = ["GpuBenchRow", "run_gpu_bench"]


@dataclass
class GpuBenchRow:
    model: str
    recipe: str
    images_per_s: float
    step_ms: float
    peak_mem_gb: float
    mfu: float | None


def _gpu_row(
    preset: str, recipe: str, batch: int, steps: int, warmup: int, device: torch.device, overrides: dict | None = None
) -> GpuBenchRow:
    """One (model, recipe) training measurement: AdamW steps on random images under the recipe's autocast."""
    impl, dtype, fp32 = {
        "bf16 sdpa": ("sdpa", torch.bfloat16, False),
        "bf16 flex": ("flex", torch.bfloat16, False),
        "fp16 release": ("sdpa", torch.float16, True),
    }[recipe]
    arch = ArchConfig(
        **{**MODEL_PRESETS[preset], **(overrides or {}), "predictor_fp32": fp32, "attn_impl": impl}
    ).resolved()
    torch.manual_seed(0)
    model = XTRA(arch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model.loss(images, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / steps
    peak = peak_flops_per_s(device)
    rate = batch / elapsed
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_memory_mb(device) / 1024
    del model, optimizer
    return GpuBenchRow(
        preset, recipe, rate, 1000 * elapsed, mem, train_flops_per_image(arch) * rate / peak if peak else None
    )


def run_gpu_bench(
    presets: tuple[str, ...] = ("xtra_b16", "xtra_h14"),
    batches: dict[str, int] | None = None,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    recipes: tuple[str, ...] = ("bf16 sdpa", "bf16 flex", "fp16 release"),
    overrides: dict | None = None,
) -> list[GpuBenchRow]:
    """XTRA-B/16 and H/14 training throughput per recipe, with ratios to bf16 dense-mask SDPA; prints a table.

    On CPU (the plumbing test, with `overrides` shrinking the models) FlexAttention cannot train, so
    its rows are left out. Default batches (B/16 128, H/14 32 per device) fit an 80 GB GPU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = batches or {"xtra_b16": 128, "xtra_h14": 32}
    if dev.type != "cuda" or not flex_available():
        recipes = tuple(r for r in recipes if "flex" not in r)
    rows = [_gpu_row(p, r, batches.get(p, 8), steps, warmup, dev, overrides) for p in presets for r in recipes]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"XTRA training on {name}: {steps} timed steps after {warmup} warm-up, AdamW, per-device batch "
        + ", ".join(f"{p} {batches.get(p, 8)}" for p in presets)
    )
    print(f"{'model':<10} {'recipe':<13} {'images/s':>9} {'step ms':>9} {'peak GB':>8} {'MFU':>6} {'vs bf16 sdpa':>13}")
    for row in rows:
        base = next(r for r in rows if r.model == row.model and r.recipe == "bf16 sdpa")
        mfu = f"{100 * row.mfu:5.1f}%" if row.mfu is not None else "   n/a"
        print(
            f"{row.model:<10} {row.recipe:<13} {row.images_per_s:>9.1f} {row.step_ms:>9.1f} "
            f"{row.peak_mem_gb:>8.2f} {mfu:>6} {row.images_per_s / base.images_per_s:>12.2f}x"
        )
    return rows
