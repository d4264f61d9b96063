"""Decode, normalise and re-encode one raw sample's image for the prepared shards.

Policies (fixed here, recorded in every manifest under `image_policy`):

- **Colour.** Every image becomes 8-bit RGB. Grey (`L`, `1`), palette (`P`), `CMYK`, `YCbCr`, `LAB`
  and `HSV` images are converted with PIL. Images with an alpha channel (`RGBA`, `LA`, `PA`, `P` with
  a transparent colour) are composited on **white**: transparent parts of photos, icons and scans are
  meant to be seen on a light page, and black-on-transparent line art would vanish on black.
  16-bit and 32-bit grey (`I;16*`, `I`, `F`) is mapped with a *fixed* scale, value * 255 / 65535
  (not a per-image min-max stretch, which would change the look of each image differently); values
  that already fit in 0..255 are kept as they are.
- **EXIF orientation is not applied**, as in torchvision's `ImageFolder` and timm, so the pixels are
  the ones every published pipeline trains on.
- **Size.** With `image_size` S > 0 the shorter side becomes S (bicubic, PIL's antialiased
  resampling when shrinking), up or down, keeping the aspect ratio; an image whose shorter side is
  already S is stored untouched. S = 0 stores the original size.
- **Encoding.** PNG (lossless) by default. JPEG quality 95, 4:4:4, only when the *source file is a
  JPEG* and the stored shorter side is over 64 px: the source was lossy already, re-encoding at
  q95 adds an error far below the source's own, and it keeps ImageNet-sized sets about 4x smaller
  and faster to decode than PNG. Small images (CIFAR, digits, EuroSAT) and lossless sources (PNG,
  TIFF, arrays) are always PNG, so nothing lossless is ever made lossy.
- **Errors.** A file that cannot be read, is truncated, is not an image, or is a decompression bomb
  gives a *reason string* instead of an image; preparation skips it and records the reason.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xtra.data.source import ImageLoader

__all__ = [
    "ALPHA_BACKGROUND",
    "JPEG_QUALITY",
    "JPEG_MIN_SIDE",
    "IMAGE_POLICY",
    "DECODE_ERRORS",
    "Converted",
    "load_image",
    "to_rgb",
    "resize_shorter",
    "encode_image",
    "failure_reason",
    "convert_image",
]

ALPHA_BACKGROUND = (255, 255, 255)  # white
JPEG_QUALITY = 95
JPEG_MIN_SIDE = 64  # stored shorter side above which a JPEG source is stored as JPEG
IMAGE_POLICY = {
    "mode": "RGB",
    "alpha_background": "white",
    "high_bit_depth": "fixed scale 255/65535",
    "exif_orientation": "ignored",
    "resize": "shorter side = image_size, bicubic; 0 keeps the size",
    "encoding": f"png; jpg q{JPEG_QUALITY} 4:4:4 when the source is JPEG and the stored shorter side > {JPEG_MIN_SIDE}",
}

# What a bad file can raise inside PIL / numpy: unreadable, truncated, not an image, too large.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # "broken PNG file", bad headers
    ValueError,
    TypeError,  # Image.fromarray on an unsupported dtype/shape
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class Converted:
    """A converted sample image: encoded pixels and, optionally, the original encoded bytes."""

    ext: str  # "png" | "jpg"
    data: bytes
    size: tuple[int, int]  # stored (width, height)
    original: tuple[str, bytes] | None = None  # (ext, bytes) when keep_original


def _array_to_image(array: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 / uint16 / bool array as a PIL image."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype == np.uint16 and a.ndim == 2:
        return Image.fromarray(a)  # mode I;16, scaled by to_rgb
    if a.dtype != np.uint8:
        raise TypeError(f"unsupported array dtype {a.dtype} (expected uint8, uint16 grey or bool)")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"unsupported array shape {a.shape} (expected (H, W), (H, W, 1|3|4))")
    return Image.fromarray(np.ascontiguousarray(a))


def load_image(image: ImageLoader) -> tuple[Image.Image, str | None, bytes | None]:
    """Open and fully decode a sample's image: (image, source format or None, original bytes or None).

    Raises one of DECODE_ERRORS for a bad file; `load()` forces the full decode, so a truncated file
    fails here and not later in a training worker.
    """
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
        return img, img.format, data
    if isinstance(image, np.ndarray):
        return _array_to_image(image), None, None
    if callable(image):
        img = image()
        if not isinstance(img, Image.Image):
            raise TypeError(f"image loader returned {type(img).__name__}, not a PIL image")
        img.load()
        return img, img.format, None
    raise TypeError(f"unsupported image reference {type(image).__name__}")


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit grey with the fixed scale 255/65535 (kept as is when already <= 255)."""
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    if a.size and float(a.max()) > 255.0:
        a = a * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, compositing alpha on ALPHA_BACKGROUND (see the module policy)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), keeping the aspect ratio; 0 keeps the image."""
    w, h = img.size
    if size <= 0 or min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def encode_image(img: Image.Image, source_format: str | None) -> tuple[str, bytes]:
    """Encode an RGB image by the module's policy: ("png" | "jpg", bytes). Deterministic."""
    buf = io.BytesIO()
    if source_format == "JPEG" and min(img.size) > JPEG_MIN_SIDE:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return "png", buf.getvalue()


def _original(img: Image.Image, fmt: str | None, data: bytes | None) -> tuple[str, bytes]:
    """The original encoded bytes (ext, bytes); a lossless PNG of the decoded image for arrays."""
    if data is not None and fmt:
        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        return ext, data
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def failure_reason(exc: BaseException) -> str:
    """A deterministic one-line reason (no object addresses, so manifests are reproducible)."""
    message = _ADDRESS.sub("<data>", str(exc)).splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")


def convert_image(image: ImageLoader, image_size: int, keep_original: bool) -> Converted | str:
    """Decode, convert to RGB, resize and encode one image; a reason string when the file is bad."""
    try:
        img, fmt, data = load_image(image)
        original = _original(img, fmt, data) if keep_original else None
        rgb = resize_shorter(to_rgb(img), image_size)
        ext, encoded = encode_image(rgb, fmt)
    except DECODE_ERRORS as exc:
        return failure_reason(exc)
    return Converted(ext=ext, data=encoded, size=rgb.size, original=original)
