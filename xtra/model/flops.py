"""What a training step costs and what the device can do: model FLOPs per image, the device's peak
half-precision rate and the peak memory in use. Training logs its model-FLOPs utilisation (MFU) from
these; `xtra bench gpu` measures with them; `online_probe_flops_per_image` is what online probes add to
a training image (`xtra bench online` prints it against `train_flops_per_image`). Nothing here imports
the benchmarks.
"""

from __future__ import annotations

import resource

import torch

from xtra.model.arch import ArchConfig

__all__ = [
    "PEAK_TFLOPS",
    "peak_flops_per_s",
    "peak_memory_mb",
    "train_flops_per_image",
    "encoder_forward_flops",
    "online_probe_flops_per_image",
]

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


def encoder_forward_flops(cfg: ArchConfig) -> float:
    """Forward FLOPs of the encoder on one image (patch embedding and blocks)."""
    cfg = cfg.resolved()
    n = cfg.grid**2
    return 2 * n * 3 * cfg.patch_size**2 * cfg.width + _transformer_flops(n, cfg.width, cfg.depth)


def online_probe_flops_per_image(
    cfg: ArchConfig, kinds: dict[str, dict], num_classes: int, heads_per_kind: int, extra_forward: bool
) -> float:
    """FLOPs online probes add to one training image: each kind's pooling and normalisation once, each of its
    `heads_per_kind` heads trained (forward + backward = 3 x forward), and, when the heads cannot reuse the
    training forward (pseudo-random block order, another labelled set), one encoder forward without gradients.
    `kinds` maps a kind (linear, attentive) to its settings (the attentive kind's `num_last_blocks`)."""
    cfg = cfg.resolved()
    n, d, c = cfg.grid**2, cfg.width, num_classes
    total = encoder_forward_flops(cfg) if extra_forward else 0.0
    for kind, settings in kinds.items():
        if kind == "attentive":
            shared = settings.get("num_last_blocks", 6) * n * d + 4 * n * d  # mean of the blocks, normalisation
            # one query: token scores and pooling over every head (2 x 2 N d), the value map (2 d^2), Linear
            head = 4 * n * d + 2 * d * d + 2 * d * c
        else:
            shared = n * d + 4 * d  # mean over tokens, normalisation
            head = 2 * d * c
        total += shared + 3.0 * head * heads_per_kind
    return total


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
