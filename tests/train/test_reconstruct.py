"""The reconstruction grid: images of distinct classes, each model drawn in its own block order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA, patchify_blocks
from xtra.train.reconstruct import _denormalize, distinct_class_indices, reconstruction_grid


def _arch(**kw) -> ArchConfig:
    base = dict(
        width=32,
        depth=1,
        num_heads=2,
        img_size=16,
        patch_size=4,
        block_size=2,
        predictor_depth=1,
        predictor_width=16,
        predictor_num_heads=2,
        attn_impl="sdpa",
        norm_pix_loss=False,
    )
    return ArchConfig(**{**base, **kw})


def test_distinct_classes_from_a_class_sorted_split() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # sorted by class, as the demo's val split is
    assert distinct_class_indices(labels, 4) == [0, 3, 5, 6]  # one of each, not four zeros
    assert distinct_class_indices(labels, 6) == [0, 3, 5, 6, 1, 4]  # then the second of each
    assert distinct_class_indices(labels, 99) == [0, 3, 5, 6, 1, 4, 7, 2]
    assert distinct_class_indices(np.array([], dtype=int), 3) == []


def _block(grid_images: torch.Tensor, row: int, block: int, c: int) -> torch.Tensor:
    """(3, c, c) pixels of raster block `block` of grid image `row`."""
    per_side = grid_images.shape[-1] // c
    r, col = divmod(block, per_side)
    return grid_images[row, :, r * c : (r + 1) * c, col * c : (col + 1) * c]


@pytest.mark.parametrize("order_kind", ["raster", "pseudo_random"])
def test_grid_follows_the_models_own_block_order(order_kind: str) -> None:
    torch.manual_seed(0)
    model = XTRA(_arch(block_order=order_kind, num_block_orders=2, block_order_seed=3)).eval()
    c, m = model.cfg.block_pixels, model.cfg.num_blocks
    order = list(model.block_orders[0]) if model.block_orders else list(range(m))
    if order_kind == "pseudo_random":
        assert order[0] != 0  # this seed's first permutation does not start at the raster corner
    images = torch.randn(2, 3, 16, 16)
    grid = reconstruction_grid(model, images)  # (6, 3, 16, 16): input, target, prediction x 2
    assert grid.shape == (6, 3, 16, 16)
    grey = _denormalize(torch.zeros(1, 3, c, c))[0]
    with torch.no_grad():
        pred = model(images, tuple(order) if model.block_orders else None)[0]  # (2, M, 3c^2)
    for i in range(2):
        target, drawn = 3 * i + 1, 3 * i + 2
        # the first block of the model's order is the one never predicted: grey in both rows
        torch.testing.assert_close(_block(grid, target, order[0], c), grey)
        torch.testing.assert_close(_block(grid, drawn, order[0], c), grey)
        # the block of rank r+1 shows the prediction made at the block of rank r
        for r in (0, m // 2, m - 2):
            expected = _denormalize(pred[i : i + 1, order[r]].view(1, 3, c, c))[0]
            torch.testing.assert_close(_block(grid, drawn, order[r + 1], c), expected)
        blocks = patchify_blocks(images[i : i + 1], c)[0]  # (M, 3c^2)
        other = order[1]  # a predicted block of the target row is the image itself
        torch.testing.assert_close(_block(grid, target, other, c), _denormalize(blocks[other].view(1, 3, c, c))[0])
