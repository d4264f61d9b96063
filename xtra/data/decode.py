"""Decoding a stored image payload (the bytes of a shard member) into the RGB PIL image the transforms take.

Shards store PNG or JPEG (q95, 4:4:4; see `xtra.data.images`). Both the streaming reader and
random access decode through `decode_rgb`, so they give the same pixels.

PIL, not torchvision.io, on the hot path. Measured here (CPU time of one thread, 2,000 stored
JPEGs of shorter side 256 cut from real photos, Pillow 13.0 with libjpeg-turbo 3.2, torchvision
0.29.1): PIL open + load 733 images/s, `torchvision.io.decode_jpeg` 755, `decode_image` 748, and
`decode_jpeg` followed by the conversion to the PIL image the transforms take 627. The pixels are
identical (both are libjpeg-turbo; max difference 0 over 200 images), so the 3 % faster decode
is lost to the conversion; a tensor-only transform pipeline would be faster (308 against 209
images/s for the whole pre-training transform) but gives different pixels than the PIL bicubic
resize every published pipeline uses.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from xtra.data.images import DECODE_ERRORS
from xtra.errors import DataError

__all__ = ["decode_rgb"]


def decode_rgb(data: bytes, where: Callable[[], str]) -> Image.Image:
    """The stored image `data` as an RGB PIL image; a DataError naming `where()` (shard, sample) when it is bad.

    `where` is called only on an error, so naming the sample (a tar header read) costs nothing per sample.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except DECODE_ERRORS as exc:
        raise DataError(f"{where()} cannot be decoded: {exc}") from exc
