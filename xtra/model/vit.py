"""Pre-norm ViT blocks with the block-causal mask: the XTRA encoder and the predictor trunk.

Module names follow the official release (`patch_embed.proj`, `pos_embed`, `blocks.{i}.norm1`,
`attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `norm`) so converting its checkpoints is a
prefix rename.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from xtra.errors import ParamsError
from xtra.model.arch import PRESETS
from xtra.model.mask import (
    AttnImpl,
    MaskSpec,
    block_causal_mask,
    block_ranks,
    build_dense_mask,
    flex_block_mask,
    resolve_attn_impl,
)

__all__ = ["Attention", "Mlp", "Block", "Transformer", "Encoder", "build_encoder", "init_weights"]

LN_EPS = 1e-6


def init_weights(module: nn.Module) -> None:
    """METHOD.md initialisation: Linear trunc-normal std 0.02 / bias 0, LayerNorm weight 1 / bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@lru_cache(maxsize=2)
def _flex_attention(device_type: str):
    """FlexAttention, compiled into a fused kernel on CUDA (eager, unfused, elsewhere: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


class Attention(nn.Module):
    """Multi-head self-attention whose mask comes from a MaskSpec; the path is chosen per call."""

    def __init__(self, dim: int, num_heads: int, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ParamsError(f"width {dim} is not divisible by the number of attention heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl: AttnImpl = attn_impl

    def forward(self, x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d/h)
        impl = resolve_attn_impl(self.attn_impl, x.device, self.training and torch.is_grad_enabled())
        if impl == "flex":
            block_mask = flex_block_mask(spec.grid, spec.block_size, x.device, spec.order)
            out = _flex_attention(x.device.type)(q, k, v, block_mask=block_mask)  # (B, h, N, d/h)
        else:
            if impl == "reference":
                mask = build_dense_mask(block_ranks(spec.grid, spec.block_size, spec.order).to(x.device))
            else:
                mask = block_causal_mask(spec.grid, spec.block_size, x.device, spec.order)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, attn_impl: AttnImpl) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), spec))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of blocks with stochastic depth rising linearly to `drop_path_rate`, and a final norm."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        drop_path_rate: float = 0.0,
        mlp_ratio: float = 4.0,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, r, attn_impl) for r in rates)
        self.norm = nn.LayerNorm(width, eps=LN_EPS)

    def set_attn_impl(self, impl: AttnImpl) -> None:
        for block in self.blocks:
            block.attn.attn_impl = impl

    def run_blocks(
        self, x: torch.Tensor, spec: MaskSpec, keep: Sequence[int] = (), stop_after: int | None = None
    ) -> tuple[torch.Tensor, list]:
        """Apply the blocks (up to `stop_after`, 0-based, if given); also return those listed in `keep`."""
        kept: dict[int, torch.Tensor] = {}
        blocks = self.blocks if stop_after is None else self.blocks[: stop_after + 1]
        for i, block in enumerate(blocks):
            x = block(x, spec)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in keep]


class Encoder(Transformer):
    """Conv patch embedding + learned absolute position embedding + block-causal ViT."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        block_size: int,
        drop_path_rate: float = 0.0,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__(width, depth, num_heads, drop_path_rate, attn_impl=attn_impl)
        if img_size % (patch_size * block_size) != 0:
            raise ParamsError(
                f"img_size {img_size} is not divisible by patch_size x block_size = {patch_size} x {block_size}"
            )
        self.img_size, self.patch_size, self.block_size = img_size, patch_size, block_size
        self.grid = img_size // patch_size
        self.width = width
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, width))
        self.block_order: tuple[int, ...] | None = None  # None = raster order
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)
        # the release: kaiming-normal (fan-in) patch embedding with a zero bias
        nn.init.kaiming_normal_(self.patch_embed.proj.weight, mode="fan_in")
        nn.init.zeros_(self.patch_embed.proj.bias)

    def mask_spec(self) -> MaskSpec:
        return MaskSpec(self.grid, self.block_size, self.block_order)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, d)
        return x + self.pos_embed

    def forward(self, x: torch.Tensor, spec: MaskSpec | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, d), after the final LayerNorm."""
        out, _ = self.run_blocks(self.embed(x), spec or self.mask_spec())
        return self.norm(out)

    def forward_features(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Outputs (B, N, d) of the chosen blocks (0-based, negative from the end), before the final norm."""
        depth = len(self.blocks)
        wanted = [depth - 1] if blocks is None else [b + depth if b < 0 else b for b in blocks]
        bad = [b for b in wanted if not 0 <= b < depth]
        if bad:
            raise ParamsError(f"blocks {list(blocks or [])} out of range for an encoder of depth {depth}")
        _, kept = self.run_blocks(self.embed(x), self.mask_spec(), keep=wanted, stop_after=max(wanted))
        return kept


def build_encoder(
    preset: str,
    img_size: int,
    patch_size: int,
    block_size: int,
    drop_path_rate: float = 0.0,
    attn_impl: AttnImpl = "auto",
) -> Encoder:
    """The encoder of a named size preset (tiny, small, base, large, huge)."""
    if preset not in PRESETS:
        raise ParamsError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return Encoder(
        img_size,
        patch_size,
        block_size=block_size,
        drop_path_rate=drop_path_rate,
        attn_impl=attn_impl,
        **PRESETS[preset],
    )
