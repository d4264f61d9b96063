"""Training throughput of XTRA per attention path: dense-mask SDPA, FlexAttention, per-call reference.

Each path trains the same model for a few steps on random data; the table gives images/s, step
time, peak memory and each path's speed relative to the reference (which rebuilds the mask inside
every call). Peak memory is the CUDA allocator's peak on GPU; on CPU each path runs in a fresh
process and the figure is that process's peak resident set (torch itself included).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.flops import peak_memory_mb
from xtra.model.mask import flex_available
from xtra.model.xtra import XTRA

__all__ = ["AttentionBenchRow", "run_attention_bench"]


@dataclass
class AttentionBenchRow:
    impl: str
    images_per_s: float
    step_ms: float
    peak_mem_mb: float


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
    return AttentionBenchRow(impl, batch / elapsed, 1000 * elapsed, peak_memory_mb(device))


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
