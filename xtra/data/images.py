"""Decode, normalise and re-encode one raw sample's image for the prepared shards.

Policies (fixed here, recorded in every manifest under `image_policy`):

- **Colour.** Every image becomes 8-bit sRGB. An image with an embedded ICC profile (a CMYK JPEG
  from a print workflow, an Adobe RGB or Display P3 photo, a grey scan) is converted from that
  profile to sRGB with Pillow's ImageCms (LittleCMS, perceptual intent); a profile that cannot be
  applied (unreadable, or for another colour space than the image's) is left out and the image is
  converted as below *with a note*. Without a profile, grey (`L`, `1`), palette (`P`), `CMYK`,
  `YCbCr`, `LAB` and `HSV` images are converted with PIL. Images with an alpha channel (`RGBA`, `LA`,
  `PA`, `P` with a transparent colour) are composited on **white**: transparent parts of photos,
  icons and scans are meant to be seen on a light page, and black-on-transparent line art would
  vanish on black.
- **Depth.** 16-bit and 32-bit grey (`I;16*`, `I`, `F`) is mapped by its real range when the file
  records it: a PNG's `sBIT` chunk (b significant bits, e.g. 12 from a camera or scanner) gives the
  scale 255 / (2^b - 1). Otherwise the scale is *fixed*, value * 255 / 65535 (not a per-image
  min-max stretch, which would change the look of each image differently), and values that already
  fit in 0..255 are kept as they are; an image whose values all stay below 4096 (12-bit data in a
  16-bit file, or a dark 16-bit image: the file cannot tell) gets a note. Pillow reads 16-bit colour
  PNGs by their high 8 bits: fine for 16-bit data, dark for 12-bit data, so such a PNG whose `sBIT`
  says fewer than 16 bits, or whose values all stay below 4096, is converted as read with a note.
- **Notes.** A note does not drop the image: it is listed with the file in the manifest's `notes`
  (and by `xtra prepare --explain`), so no image is converted wrongly without a word.
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

import functools
import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

from xtra.data.source import ImageLoader

__all__ = [
    "ALPHA_BACKGROUND",
    "JPEG_QUALITY",
    "JPEG_MIN_SIDE",
    "IMAGE_POLICY",
    "DECODE_ERRORS",
    "Converted",
    "load_image",
    "png_depth",
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
    "icc_profile": "applied when embedded: to sRGB with ImageCms (LittleCMS), perceptual intent; else a note",
    "high_bit_depth": "grey: 255/(2^b-1) with b from PNG sBIT, else fixed 255/65535 and a note below 4096; "
    "16-bit colour PNG: high byte, a note when sBIT < 16 or values below 4096",
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
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}  # PNG colour type -> its colour (not alpha) channels
_TWELVE_BITS = 4096  # values all below it: 12-bit data, or a dark image, in a 16-bit file
_SRGB = ImageCms.createProfile("sRGB")
_PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}  # ICC colour space -> the image mode it applies to


@dataclass(frozen=True)
class Converted:
    """A converted sample image: encoded pixels and, optionally, the original encoded bytes."""

    ext: str  # "png" | "jpg"
    data: bytes
    size: tuple[int, int]  # stored (width, height)
    original: tuple[str, bytes] | None = None  # (ext, bytes) when keep_original
    note: str | None = None  # why the conversion may not look right (depth unknown, profile not applied)


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


def png_depth(data: bytes | None) -> tuple[int, int, int | None] | None:
    """(bit depth, colour type, significant bits of the colour channels from `sBIT` or None) of a PNG
    file's bytes; None for any other file. Pillow does not read `sBIT`, so the chunks before the image
    data are read here."""
    if not data or not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, sbit = len(_PNG_SIGNATURE), None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = (body[8], body[9])
        elif kind == b"sBIT" and header is not None and body:
            sbit = max(body[: _PNG_COLOUR_CHANNELS.get(header[1], 1)])
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return None if header is None else (header[0], header[1], sbit)


def _high_bit_to_l(img: Image.Image, sbit: int | None, notes: list[str]) -> Image.Image:
    """16/32-bit grey -> 8-bit grey: 255/(2^sbit - 1) with the file's sBIT, else the fixed 255/65535 (kept
    as is when already <= 255), with a note when the values stay below 4096 (see the module policy)."""
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    top = float(a.max()) if a.size else 0.0
    if sbit:
        a = a * (255.0 / (2**sbit - 1))
    elif top > 255.0:
        a = a * (255.0 / 65535.0)
        if top < _TWELVE_BITS:
            notes.append(
                f"{img.mode} values stay below {_TWELVE_BITS} (max {top:g}) and no sBIT chunk gives their depth: "
                "converted with the fixed scale 255/65535 (dark if the data are 12-bit)"
            )
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _check_16bit_colour(img: Image.Image, png: tuple[int, int, int | None] | None, notes: list[str]) -> None:
    """A note for a 16-bit colour PNG that Pillow's high-byte reading leaves dark (see the module policy)."""
    if png is None or png[0] != 16 or png[1] not in (2, 4, 6):
        return
    sbit = png[2]
    if sbit is not None and sbit < 16:
        reach = 2 ** max(sbit - 8, 0) - 1
        notes.append(
            f"16-bit PNG with {sbit} significant bits (sBIT): Pillow reads the high 8 of 16 bits, so values "
            f"reach {reach} of 255: converted as read (dark)"
        )
    elif sbit is None and np.asarray(img)[..., : _PNG_COLOUR_CHANNELS[png[1]]].max(initial=0) < _TWELVE_BITS >> 8:
        notes.append(
            f"16-bit PNG whose values stay below {_TWELVE_BITS} and no sBIT chunk gives their depth: Pillow reads "
            "the high 8 of 16 bits, converted as read (dark if the data are 12-bit)"
        )


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The transform from an embedded profile to sRGB for images of `mode` (cached: files share profiles)."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    space = source.profile.xcolor_space.strip()
    if _PROFILE_MODES.get(space) != mode:
        raise ValueError(f"the profile is for {space} colour, the image is {mode}")
    return ImageCms.buildTransform(source, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL)


def _on_background(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited on ALPHA_BACKGROUND, as RGB."""
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _profile_to_srgb(img: Image.Image, icc: bytes, notes: list[str]) -> Image.Image | None:
    """The image converted from its ICC profile to sRGB (alpha composited), or None with a note."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    alpha = None
    if img.mode in _ALPHA_MODES:
        colour_mode = "L" if img.mode in ("LA", "La") else "RGB"
        alpha = img.convert("LA" if colour_mode == "L" else "RGBA").getchannel("A")
        img = img.convert(colour_mode)
    elif img.mode not in _PROFILE_MODES.values():
        img = img.convert("L" if img.mode == "1" else "RGB")
    try:
        rgb = _srgb_transform(icc, img.mode).apply(img)
    except (ImageCms.PyCMSError, ValueError, OSError) as exc:
        notes.append(f"embedded ICC profile not applied ({failure_reason(exc)}): colours converted without it")
        return None
    if alpha is None:
        return rgb
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    return _on_background(rgba)


def to_rgb(img: Image.Image, png: tuple[int, int, int | None] | None = None) -> tuple[Image.Image, list[str]]:
    """Any PIL mode -> (8-bit sRGB image, notes), by the module policy: the embedded ICC profile applied,
    high bit depths scaled (`png`: what `png_depth` read from the file), alpha composited on
    ALPHA_BACKGROUND. A note says why the result may not look right."""
    notes: list[str] = []
    icc = img.info.get("icc_profile")
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img, png[2] if png else None, notes)
    else:
        _check_16bit_colour(img, png, notes)
    if icc and (converted := _profile_to_srgb(img, icc, notes)) is not None:
        return converted, notes
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGB":
        rgb = img
    elif img.mode in _ALPHA_MODES:
        rgb = _on_background(img.convert("RGBA"))
    else:
        rgb = img.convert("RGB")
    if icc:  # not applied: the stored image must not claim the profile
        rgb = rgb.copy()
        rgb.info.pop("icc_profile", None)
    return rgb, notes


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
        rgb, notes = to_rgb(img, png_depth(data))
        rgb = resize_shorter(rgb, image_size)
        ext, encoded = encode_image(rgb, fmt)
    except DECODE_ERRORS as exc:
        return failure_reason(exc)
    return Converted(ext=ext, data=encoded, size=rgb.size, original=original, note="; ".join(notes) or None)
