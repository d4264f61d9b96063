"""The XTRA pre-training model: encoder -> projection -> predictor -> block concatenation -> pixel heads.

Shapes (METHOD.md): S image side, p patch, G = S/p, N = G^2 tokens, k block side in patches,
g = G/k, M = g^2 blocks, c = k*p block side in pixels, d encoder width, d_pred predictor width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xtra.model.arch import ArchConfig
from xtra.model.mask import MaskSpec
from xtra.model.vit import Encoder, Transformer, init_weights

__all__ = [
    "RELEASE_PARAMETER_ORDER",
    "release_ordered_parameters",
    "XTRA",
    "build_arch_encoder",
    "block_orders_of",
    "patchify_blocks",
    "unpatchify_blocks",
    "normalize_blocks",
    "concat_blocks",
    "xtra_loss",
]


def patchify_blocks(images: torch.Tensor, block_pixels: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, M, 3*c*c): blocks in raster order, each flattened channel-major (3, c, c)."""
    b, ch, s, _ = images.shape
    g = s // block_pixels
    x = images.reshape(b, ch, g, block_pixels, g, block_pixels)  # (B, 3, g, c, g, c)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * block_pixels * block_pixels)


def unpatchify_blocks(blocks: torch.Tensor, block_pixels: int) -> torch.Tensor:
    """Inverse of patchify_blocks: (B, M, 3*c*c) -> (B, 3, S, S)."""
    b, m, _ = blocks.shape
    g = int(round(m**0.5))
    x = blocks.reshape(b, g, g, 3, block_pixels, block_pixels).permute(0, 3, 1, 4, 2, 5)  # (B, 3, g, c, g, c)
    return x.reshape(b, 3, g * block_pixels, g * block_pixels)


def normalize_blocks(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-block normalisation: subtract the mean, divide by sqrt(unbiased var + eps). (B, M, D) -> same."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / torch.sqrt(var + eps)


def concat_blocks(tokens: torch.Tensor, grid: int, block_size: int) -> torch.Tensor:
    """(B, N, d) raster tokens -> (B, M, d*k*k): each block's k x k tokens, channel-major (d, row, col)."""
    b, _, d = tokens.shape
    g = grid // block_size
    x = tokens.transpose(1, 2).reshape(b, d, g, block_size, g, block_size)  # (B, d, g, k, g, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, d * block_size * block_size)


def xtra_loss(preds: list[torch.Tensor], target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Mean over pixel heads j of the error of pred_j[:, :M-1-j] against target[:, 1+j:]. All (B, M, 3c^2)."""
    error = F.mse_loss if loss == "mse" else F.l1_loss
    m = target.shape[1]
    terms = [error(p[:, : m - 1 - j].float(), target[:, 1 + j :].float()) for j, p in enumerate(preds)]
    return torch.stack(terms).mean()


class _MLP2(nn.Module):
    """Two linear layers with GELU between, stored as `mlp.0` / `mlp.2` like the official release."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, last_bias: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out, bias=last_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Predictor(Transformer):
    """Learned position embedding (N x d_pred) + block-causal blocks of width d_pred + final norm."""

    def __init__(self, num_tokens: int, width: int, depth: int, num_heads: int, attn_impl: str) -> None:
        super().__init__(width, depth, num_heads, 0.0, attn_impl=attn_impl)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
        out, _ = self.run_blocks(x + self.pos_embed, spec)
        return self.norm(out)


def block_orders_of(cfg: ArchConfig) -> list[tuple[int, ...]] | None:
    """The pseudo-random block permutations of the ablation (None for raster order).

    As in the public release: `num_block_orders` permutations (default: as many as there are blocks,
    M), drawn from `block_order_seed` so that no two share a prefix: their first blocks are distinct
    (a seeded choice of distinct first blocks, each followed by a seeded shuffle of the others).
    """
    if cfg.block_order == "raster":
        return None
    m = cfg.num_blocks
    count = cfg.num_block_orders or m
    gen = torch.Generator().manual_seed(cfg.block_order_seed)
    firsts = torch.randperm(m, generator=gen)[:count].tolist()
    orders = []
    for first in firsts:
        rest = [b for b in range(m) if b != first]
        shuffled = torch.randperm(m - 1, generator=gen).tolist()
        orders.append((first, *(rest[i] for i in shuffled)))
    return orders


def build_arch_encoder(cfg: ArchConfig) -> Encoder:
    """The encoder of an architecture config (preset size with its overrides)."""
    cfg = cfg.resolved()
    return Encoder(
        cfg.img_size,
        cfg.patch_size,
        cfg.width,
        cfg.depth,
        cfg.num_heads,
        cfg.block_size,
        cfg.drop_path_rate,
        attn_impl=cfg.attn_impl,
    )


class XTRA(nn.Module):
    """The full pre-training model; `encoder` alone is what probing uses."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg = cfg.resolved()
        self.encoder = build_arch_encoder(cfg)
        self.proj = _MLP2(cfg.width, cfg.proj_hidden, cfg.predictor_width, last_bias=False)
        self.predictor = Predictor(
            cfg.grid**2, cfg.predictor_width, cfg.predictor_depth, cfg.predictor_num_heads, cfg.attn_impl
        )
        in_dim = cfg.predictor_width * cfg.block_size**2
        out_dim = 3 * cfg.block_pixels**2
        self.pixel_heads = nn.ModuleList(
            _MLP2(in_dim, cfg.head_hidden, out_dim, last_bias=True) for _ in range(cfg.num_heads_ahead)
        )
        self.proj.apply(init_weights)
        self.pixel_heads.apply(init_weights)
        self.block_orders = block_orders_of(cfg)  # probing keeps the encoder in raster order

    def set_attn_impl(self, impl: str) -> None:
        self.encoder.set_attn_impl(impl)  # type: ignore[arg-type]
        self.predictor.set_attn_impl(impl)  # type: ignore[arg-type]

    def order_for_step(self, step: int | None) -> tuple[int, ...] | None:
        """The permutation of optimiser step `step`: one of `block_orders`, drawn uniformly from a seed of
        (block_order_seed, step), so every rank and a resumed run draw the same; `None` (validation)
        gives the first permutation."""
        if self.block_orders is None:
            return None
        if step is None:
            return self.block_orders[0]
        from xtra.data.rng import derive_seed

        return self.block_orders[
            derive_seed(self.cfg.block_order_seed, "block_order", int(step)) % len(self.block_orders)
        ]

    def forward(self, images: torch.Tensor, order: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """(B, 3, S, S) -> one (B, M, 3c^2) prediction per head, blocks in raster order."""
        cfg = self.cfg
        spec = MaskSpec(cfg.grid, cfg.block_size, order)
        z = self.proj(self.encoder(images, spec))  # (B, N, d_pred)
        device = images.device.type
        if cfg.predictor_fp32 and torch.is_autocast_enabled(device):
            # the release's fp16 recipe: the predictor alone in fp32, cast back before the pixel heads
            with torch.autocast(device, enabled=False):
                z = self.predictor(z.float(), spec)  # (B, N, d_pred) fp32
            z = z.to(torch.get_autocast_dtype(device))
        else:
            z = self.predictor(z, spec)  # (B, N, d_pred)
        blocks = concat_blocks(z, cfg.grid, cfg.block_size)  # (B, M, d_pred*k*k)
        return [head(blocks) for head in self.pixel_heads]  # each (B, M, 3c^2)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, M, 3c^2) targets in raster block order."""
        target = patchify_blocks(images, self.cfg.block_pixels)
        return normalize_blocks(target) if self.cfg.norm_pix_loss else target

    def loss(self, images: torch.Tensor, step: int | None = 0) -> torch.Tensor:
        """The training loss at optimiser step `step` (its block order); `step=None`: validation."""
        order = self.order_for_step(step)
        preds, target = self(images, order), self.targets(images)
        if order is not None:  # predict blocks in the permuted order: reorder blocks by rank
            perm = torch.as_tensor(order, device=images.device)
            preds, target = [p[:, perm] for p in preds], target[:, perm]
        return xtra_loss(preds, target, self.cfg.loss)


# The public release's module tree in the order of its state dict (= its `named_parameters()`, from which
# it builds its AdamW groups), in this project's names: the encoder's position embedding, patch
# embedding, blocks and final norm; the projection; the predictor's position embedding, blocks, norm;
# the pixel heads. Inside a block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 (as ours).
RELEASE_PARAMETER_ORDER = (
    "encoder.pos_embed",
    "encoder.patch_embed.",
    "encoder.blocks.",
    "encoder.norm.",
    "proj.",
    "predictor.pos_embed",
    "predictor.blocks.",
    "predictor.norm.",
    "pixel_heads.",
)


def release_ordered_parameters(model: XTRA) -> list[nn.Parameter]:
    """The model's parameters in the order of the release's module tree (`RELEASE_PARAMETER_ORDER`).

    Ours differs in one place: an `Encoder` is a `Transformer` with a patch embedding added, so its
    blocks and norm are registered before the patch embedding. The order matters once gradients are
    clipped: the total norm sums the parameters' norms in this order (and a different order moves the
    clipped update in its last bits). Blocks keep their numbering (a stable sort).
    """

    def rank(item: tuple[str, nn.Parameter]) -> int:
        for i, prefix in enumerate(RELEASE_PARAMETER_ORDER):
            if item[0].startswith(prefix):
                return i
        raise KeyError(f"parameter {item[0]} has no place in RELEASE_PARAMETER_ORDER")

    return [param for _, param in sorted(model.named_parameters(), key=rank)]
