"""What a training step costs and what the device can do: model FLOPs per image, the device's peak
half-precision rate and the peak memory in use. Training logs its model-FLOPs utilisation (MFU) from
these; `xtra bench gpu` measures with them. Nothing here imports the benchmarks.
"""

from __future__ import annotations

import resource

import torch

from xtra.model.arch import ArchConfig

__all__ = ["PEAK_TFLOPS", "peak_flops_per_s", "peak_memory_mb", "train_flops_per_image"]

# dense bf16/fp16 tensor-core peaks (vendor data sheets, no sparsity), by a substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_flops_per_s(device: torch.device) -> float | None:
    """The device's dense half-precision peak in FLOP/s, or None (CPU, unknown GPU): MFU is then not given."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: the CUDA allocator's peak on a GPU, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


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
