"""The architecture config of XTRA and its presets: the size presets (`PRESETS`: width, depth and
attention heads of tiny .. huge) and the paper's two models (`MODEL_PRESETS`), one home for both.

`ArchConfig` holds every knob of METHOD.md; its defaults and enums are those of the schema's
`$defs/arch` (the enums are read from it, a test checks the defaults and that every field is a key
and every key a field). Kept free of torch imports so that validating params.yaml (`xtra
validate`, Snakemake's DAG planning) takes about a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from xtra.config import schema_section
from xtra.errors import ParamsError

__all__ = ["PRESETS", "MODEL_PRESETS", "ArchConfig"]

# width / depth / attention heads (METHOD.md, "Architecture")
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 192, "depth": 12, "num_heads": 3},
    "small": {"width": 384, "depth": 12, "num_heads": 6},
    "base": {"width": 768, "depth": 12, "num_heads": 12},
    "large": {"width": 1024, "depth": 24, "num_heads": 16},
    "huge": {"width": 1280, "depth": 32, "num_heads": 16},
}

# Defaults of the paper's two models (METHOD.md "Architecture"); anything not given follows the rules
# in ArchConfig.resolved().
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "xtra_b16": {
        "preset": "base",
        "img_size": 256,
        "patch_size": 16,
        "block_size": 4,
        "proj_hidden": 4096,
        "predictor_width": 768,
        "predictor_num_heads": 6,
        "head_hidden": 6144,
    },
    "xtra_h14": {
        "preset": "huge",
        "img_size": 224,
        "patch_size": 14,
        "block_size": 4,
        "proj_hidden": 5120,
        "predictor_width": 640,
        "predictor_num_heads": 8,
        "head_hidden": 9408,
    },
}


@dataclass(frozen=True)
class ArchConfig:
    """Every architecture knob of METHOD.md, including the ablation switches."""

    preset: str = "tiny"
    width: int | None = None  # overrides of the preset's width / depth / attention heads (small demo models)
    depth: int | None = None
    num_heads: int | None = None
    img_size: int = 32
    patch_size: int = 4
    block_size: int = 2
    drop_path_rate: float = 0.0
    proj_hidden: int | None = None  # default 4 * d
    predictor_depth: int = 8
    predictor_width: int | None = None  # default d
    predictor_num_heads: int | None = None  # default max(1, d_pred // 64)
    head_hidden: int | None = None  # default 3 * c^2
    num_heads_ahead: int = 1
    norm_pix_loss: bool = True
    loss: str = "mse"  # mse | l1
    block_order: str = "raster"  # raster | pseudo_random
    num_block_orders: int | None = None  # pseudo-random permutations; None: as many as blocks (the release)
    block_order_seed: int = 0
    predictor_fp32: bool = False  # the public fp16 recipe: the predictor (only) forced to fp32
    attn_impl: str = "auto"  # auto | sdpa | flex | reference

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> ArchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise ParamsError(f"unknown arch key(s) {unknown}; known: {sorted(known)}")
        return cls(**arch).resolved()

    def resolved(self) -> ArchConfig:
        """Fill the defaults that depend on other fields and check the combination."""
        if self.preset not in PRESETS:
            raise ParamsError(f"arch.preset: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        if self.img_size % (self.patch_size * self.block_size) != 0:
            raise ParamsError(
                f"arch.img_size {self.img_size} is not divisible by patch_size x block_size "
                f"= {self.patch_size} x {self.block_size}"
            )
        props = schema_section("arch")["properties"]  # the one home of the enums
        for key in ("loss", "block_order", "attn_impl"):
            if getattr(self, key) not in props[key]["enum"]:
                raise ParamsError(f"arch.{key}: expected one of {props[key]['enum']}, got {getattr(self, key)!r}")
        num_blocks = (self.img_size // (self.patch_size * self.block_size)) ** 2
        if self.num_block_orders is not None and not 1 <= self.num_block_orders <= num_blocks:
            raise ParamsError(
                f"arch.num_block_orders {self.num_block_orders} must be in [1, {num_blocks}] "
                f"(permutations with distinct first blocks) or null (all {num_blocks})"
            )
        if not 1 <= self.num_heads_ahead < num_blocks:
            raise ParamsError(f"arch.num_heads_ahead {self.num_heads_ahead} must be in [1, {num_blocks - 1}]")
        overrides = {"width": self.width, "depth": self.depth, "num_heads": self.num_heads}
        size = {**PRESETS[self.preset], **{k: v for k, v in overrides.items() if v is not None}}
        if size["width"] % size["num_heads"] != 0:
            raise ParamsError(f"arch: width {size['width']} is not divisible by num_heads {size['num_heads']}")
        d = size["width"]
        d_pred = self.predictor_width or d
        c = self.block_size * self.patch_size
        return ArchConfig(
            **{
                **asdict(self),
                **size,
                "proj_hidden": self.proj_hidden or 4 * d,
                "predictor_width": d_pred,
                "predictor_num_heads": self.predictor_num_heads or max(1, d_pred // 64),
                "head_hidden": self.head_hidden or 3 * c * c,
            }
        )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_blocks(self) -> int:
        return (self.grid // self.block_size) ** 2

    @property
    def block_pixels(self) -> int:
        return self.block_size * self.patch_size
