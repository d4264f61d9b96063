"""Decoding a stored image payload (the bytes of a shard member) into the RGB PIL image the transforms take.

Shards store PNG or JPEG (q95, 4:4:4; see `xtra.data.images`). Both the streaming reader and
random access decode through `decode_rgb`, so they give the same pixels.
"""

from __future__ import annotations

import io

from PIL import Image

from xtra.data.images import DECODE_ERRORS
from xtra.errors import DataError

__all__ = ["decode_rgb"]


def decode_rgb(data: bytes, is_jpeg: bool, where: str) -> Image.Image:
    """The stored image `data` as an RGB PIL image; a DataError naming `where` (shard, sample) when it is bad."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except DECODE_ERRORS as exc:
        raise DataError(f"{where} cannot be decoded: {exc}") from exc
