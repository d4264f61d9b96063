"""Block ids and the block-causal attention mask of XTRA (METHOD.md, "Shapes and names").

Tokens stay in patch raster order over the G x G grid. The patch at row i, column j belongs to block
`b(i, j) = (i // k) * g + (j // k)` with g = G / k. Token q may attend to token t iff
`rank(b(t)) <= rank(b(q))`, where `rank` is the position of a block in the prediction order: the
identity for raster order, the inverse of a block permutation for the pseudo-random-order ablation.

Three implementations of the same mask are offered and chosen at run time:
- "sdpa": a dense (N, N) boolean mask, cached, for `scaled_dot_product_attention` (CPU and GPU);
- "flex": a FlexAttention `BlockMask` built from the same rule (GPU; skips fully masked tiles);
- "reference": the dense mask rebuilt inside every call (the straightforward baseline for benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from xtra.errors import ParamsError

__all__ = [
    "AttnImpl",
    "block_ids",
    "block_ranks",
    "block_causal_mask",
    "build_dense_mask",
    "flex_block_mask",
    "flex_available",
    "resolve_attn_impl",
    "MaskSpec",
]

AttnImpl = Literal["auto", "sdpa", "flex", "reference"]


def block_ids(grid: int, block_size: int) -> torch.Tensor:
    """Block id of every token in raster order: (N,) long, N = grid**2."""
    if block_size < 1 or grid % block_size != 0:
        raise ParamsError(
            f"block_size {block_size} must divide the patch grid side {grid} (grid = img_size / patch_size)"
        )
    g = grid // block_size
    rows = torch.arange(grid).unsqueeze(1) // block_size  # (G, 1)
    cols = torch.arange(grid).unsqueeze(0) // block_size  # (1, G)
    return (rows * g + cols).reshape(-1)  # (N,)


def block_ranks(grid: int, block_size: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Prediction rank of every token's block: (N,) long. `order[r]` is the block predicted r-th."""
    ids = block_ids(grid, block_size)
    if order is None:
        return ids
    num_blocks = (grid // block_size) ** 2
    perm = torch.as_tensor(list(order), dtype=torch.long)
    if perm.numel() != num_blocks or not torch.equal(perm.sort().values, torch.arange(num_blocks)):
        raise ParamsError(f"block order {list(order)} is not a permutation of the {num_blocks} blocks")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(num_blocks)
    return inverse[ids]


def build_dense_mask(ranks: torch.Tensor) -> torch.Tensor:
    """(N, N) bool, True where query q (row) may attend to key t (column): rank[t] <= rank[q]."""
    return ranks.unsqueeze(0) <= ranks.unsqueeze(1)


@lru_cache(maxsize=64)
def _cached_dense(grid: int, block_size: int, order: tuple[int, ...] | None, device: str) -> torch.Tensor:
    return build_dense_mask(block_ranks(grid, block_size, order)).to(device)


def block_causal_mask(
    grid: int, block_size: int, device: torch.device | str = "cpu", order: Sequence[int] | None = None
) -> torch.Tensor:
    """The dense block-causal mask, cached per (grid, block size, order, device): (N, N) bool."""
    key = tuple(int(o) for o in order) if order is not None else None
    return _cached_dense(grid, block_size, key, str(torch.device(device)))


def flex_available() -> bool:
    """True when FlexAttention can be used (a CUDA device and the torch module present)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=64)
def _cached_flex(grid: int, block_size: int, order: tuple[int, ...] | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    ranks = block_ranks(grid, block_size, order).to(device)
    n = ranks.numel()

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's callback signature
        return ranks[kv_idx] <= ranks[q_idx]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


def flex_block_mask(grid: int, block_size: int, device: torch.device | str, order: Sequence[int] | None = None):
    """FlexAttention BlockMask of the same rule, cached per (grid, block size, order, device)."""
    key = tuple(int(o) for o in order) if order is not None else None
    return _cached_flex(grid, block_size, key, str(torch.device(device)))


def resolve_attn_impl(impl: AttnImpl, device: torch.device, training: bool) -> str:
    """Pick the attention path for a call. "auto": FlexAttention on CUDA, dense-mask SDPA elsewhere.

    FlexAttention has no CPU backward in torch 2.14, so "flex" on CPU is refused while training.
    """
    if impl == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if impl == "flex" and device.type != "cuda" and training:
        raise ParamsError("attn_impl 'flex' cannot train on CPU (no FlexAttention CPU backward); use 'sdpa'")
    if impl not in ("sdpa", "flex", "reference"):
        raise ParamsError(f"unknown attn_impl {impl!r}; expected auto, sdpa, flex or reference")
    return impl


@dataclass(frozen=True)
class MaskSpec:
    """What an attention layer needs to build its mask: grid, block size and block order."""

    grid: int
    block_size: int
    order: tuple[int, ...] | None = None
