"""Training throughput of XTRA per attention path: dense-mask SDPA, FlexAttention, per-call reference.

Each path trains the same model for a few steps on random data; the table gives images/s, step
time, peak memory and each path's speed relative to the reference (which rebuilds the mask inside
every call). Peak memory is the CUDA allocator's peak on GPU; on CPU each path runs in a fresh
process and the figure is that process's peak resident set (torch itself included).

`run_gpu_bench` (`xtra bench gpu`) measures the paper's two models (XTRA-B/16, XTRA-H/14) in
training: bf16 with dense-mask SDPA, bf16 with compiled FlexAttention, and the release's fp16
recipe (fp16 autocast + loss scaling, the predictor in fp32), as ratios to the first, with the
model-FLOPs utilisation against the device's dense bf16 peak (`PEAK_TFLOPS`).
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.mask import flex_available
from xtra.model.xtra import XTRA

__all__ = [
    "AttentionBenchRow",
    "run_attention_bench",
    "GpuBenchRow",
    "run_gpu_bench",
    "train_flops_per_image",
    "peak_flops_per_s",
    "resolved_attention",
    "PEAK_TFLOPS",
]


@dataclass
class AttentionBenchRow:
    impl: str
    images_per_s: float
    step_ms: float
    peak_mem_mb: float


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _time_path(
    arch: ArchConfig, impl: str, batch: int, steps: int, warmup: int, device: torch.device, dtype: torch.dtype | None
) -> AttentionBenchRow:
    torch.manual_seed(0)
    model = XTRA(arch).to(device)
    model.set_attn_impl(impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.loss(images, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / steps
    return AttentionBenchRow(impl, batch / elapsed, 1000 * elapsed, _peak_mb(device))


def _time_path_isolated(*args) -> AttentionBenchRow:
    """On CPU, run one path in a fresh process so its peak RSS is its own."""
    if args[-2].type == "cuda":
        return _time_path(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_time_path, *args).result()


def run_attention_bench(
    preset: str = "tiny",
    batch: int = 32,
    steps: int = 5,
    warmup: int = 2,
    block_size: int | None = None,
    device: str | None = None,
    bf16: bool = False,
    overrides: dict | None = None,
) -> list[AttentionBenchRow]:
    """Benchmark every available attention path; prints a table and returns its rows."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = dict(MODEL_PRESETS[preset]) if preset in MODEL_PRESETS else {"preset": preset}
    if block_size is not None:
        base["block_size"] = block_size
    arch = ArchConfig(**{**base, **(overrides or {})}).resolved()
    impls = ["sdpa", "reference"] + (["flex"] if dev.type == "cuda" and flex_available() else [])
    dtype = torch.bfloat16 if bf16 else None
    rows = [_time_path_isolated(arch, impl, batch, steps, warmup, dev, dtype) for impl in impls]
    reference = next(r for r in rows if r.impl == "reference")
    print(
        f"XTRA training throughput: {preset} {arch.img_size}px patch {arch.patch_size} k={arch.block_size}, "
        f"batch {batch}, {steps} timed steps on {dev}{' bf16' if bf16 else ''}"
    )
    print(
        f"{'path':<10} {'images/s':>10} {'step ms':>10} {'peak MB':>10} {'vs reference':>13}"
        + ("" if dev.type == "cuda" else "   (peak MB: process RSS)")
    )
    for row in rows:
        print(
            f"{row.impl:<10} {row.images_per_s:>10.1f} {row.step_ms:>10.1f} {row.peak_mem_mb:>10.1f} "
            f"{row.images_per_s / reference.images_per_s:>12.2f}x"
        )
    if dev.type != "cuda":
        print("(FlexAttention is measured on CUDA only: it has no CPU backward in this torch)")
    return rows


# ---- model FLOPs, peak rates and the `xtra bench gpu` measurement ----------------------------------

# dense bf16/fp16 tensor-core peaks (vendor data sheets, no sparsity), by a substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_flops_per_s(device: torch.device) -> float | None:
    """The device's dense half-precision peak in FLOP/s, or None (CPU, unknown GPU): MFU is then not given."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def resolved_attention(impl: str, device: torch.device) -> str:
    from xtra.model.mask import resolve_attn_impl

    return resolve_attn_impl(impl, device, training=False)  # type: ignore[arg-type]


def _transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` blocks: qkv/proj/MLP matmuls plus dense attention (QK^T and AV)."""
    matmul = 2 * tokens * width * width * (4 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * width
    return depth * (matmul + attention)


def train_flops_per_image(cfg: ArchConfig) -> float:
    """Model FLOPs of one training image (forward + backward = 3 x forward), attention counted dense."""
    cfg = cfg.resolved()
    n, d, dp, m = cfg.grid**2, cfg.width, cfg.predictor_width, cfg.num_blocks
    c2 = 3 * cfg.block_pixels**2
    forward = (
        2 * n * 3 * cfg.patch_size**2 * d
        + _transformer_flops(n, d, cfg.depth)
        + 2 * n * (d * cfg.proj_hidden + cfg.proj_hidden * dp)
        + _transformer_flops(n, dp, cfg.predictor_depth)
        + cfg.num_heads_ahead * 2 * m * (dp * cfg.block_size**2 * cfg.head_hidden + cfg.head_hidden * c2)
    )
    return 3.0 * forward


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
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _peak_mb(device) / 1024
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
