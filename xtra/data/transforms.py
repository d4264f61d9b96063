"""The image transforms of METHOD.md: PIL RGB image -> normalised float tensor (3, S, S).

- pre-training: RandomResizedCrop(S, scale 0.3-1.0, ratio 0.75-1.5, bicubic) + horizontal flip;
- probe training, by `probe.kinds.<kind>.augmentation` (`probe_train_transform`):
  `randaugment`: timm's ImageNet training transform: RandomResizedCrop(S) (timm's default scale
  0.08-1, ratio 3/4-4/3, bicubic) + flip + RandAugment `rand-m9-mstd0.5-inc1` (bicubic) + random
  erasing p 0.25, pixel mode, on CPU (colour jitter is off, as timm does with RandAugment; the
  release's attentive probes and its H/14 linear probe); `crop_flip`: RandomResizedCrop(S, scale
  0.08-1, bicubic) + horizontal flip (the release's B/16 linear probe); `none`: the evaluation transform;
- evaluation: resize the shorter side to `resize` (bicubic) + centre crop S.
All end with ToTensor and ImageNet mean/std normalisation (timm's constants).

Compatibility: timm's `PosterizeIncreasing` op (part of `inc1`) reaches "keep 0 bits" at the top
magnitude (mstd 0.5 around 9, clipped at 10), which Pillow < 13 turned into a black image and
Pillow 13 rejects with a ValueError, so probe training would crash at random. The RandAugment
built by timm is kept; only its posterize ops get `_posterize_compat`, which restores the old
result (black) for 0 bits and calls Pillow otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from xtra.errors import ParamsError

__all__ = [
    "RAND_AUGMENT",
    "ToNormalisedTensor",
    "PRETRAIN_SCALE",
    "PRETRAIN_RATIO",
    "AUGMENTATIONS",
    "pretrain_transform",
    "randaugment_transform",
    "probe_train_transform",
    "eval_transform",
    "default_eval_resize",
]

Transform = Callable[[Image.Image], torch.Tensor]

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
PRETRAIN_SCALE = (0.3, 1.0)
PRETRAIN_RATIO = (0.75, 1.5)
RANDOM_ERASING_P = 0.25
AUGMENTATIONS = ("randaugment", "crop_flip", "none")  # probe training transforms (the schema's enum)


class ToNormalisedTensor:
    """RGB PIL image (W, H) -> float32 (3, H, W), (x / 255 - mean) / std: ToTensor + Normalize fused.

    The same float operations in the same order as torchvision's `ToTensor()` then `Normalize()`
    (bit-identical results, tested), without Normalize's clone and ToTensor's extra copy: measured
    here 0.76 + ~0.3 ms against 1.22 + 0.62 ms for a 224 px image, a quarter of the pre-training
    transform's CPU time.
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            raise ValueError(f"ToNormalisedTensor takes RGB images, got mode {img.mode!r}")
        with warnings.catch_warnings():  # a read-only view: it is copied by contiguous(), never written
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        return x.contiguous().to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return "ToNormalisedTensor(ImageNet mean/std)"


def _to_normalised_tensor() -> list:
    return [ToNormalisedTensor()]


def pretrain_transform(img_size: int) -> Transform:
    """Pre-training augmentation -> (3, img_size, img_size) normalised."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size, scale=PRETRAIN_SCALE, ratio=PRETRAIN_RATIO, interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(0.5),
            *_to_normalised_tensor(),
        ]
    )


def _posterize_compat(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, where 0 bits gives a black image (as Pillow < 13 did) instead of an error."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: zeros
    return ImageOps.posterize(img, bits)


def _patch_posterize(transform: T.Compose) -> T.Compose:
    found = False
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn, found = _posterize_compat, True
    assert found, "timm's RandAugment has no posterize op to patch"
    return transform


def randaugment_transform(img_size: int) -> Transform:
    """Probe-training augmentation (timm: RRC + flip + RandAugment + random erasing) -> (3, S, S)."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        hflip=0.5,
        auto_augment=RAND_AUGMENT,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        re_prob=RANDOM_ERASING_P,
        re_mode="pixel",
        re_count=1,
    )
    return _patch_posterize(transform)


def probe_train_transform(augmentation: str, img_size: int, eval_resize: int) -> Transform:
    """The probe-training transform named by `augmentation` (one of AUGMENTATIONS) -> (3, S, S)."""
    if augmentation == "randaugment":
        return randaugment_transform(img_size)
    if augmentation == "crop_flip":
        return T.Compose(
            [
                T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(0.5),
                T.ToTensor(),
                T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
            ]
        )
    if augmentation == "none":
        return eval_transform(img_size, eval_resize)
    raise ParamsError(f"probe augmentation {augmentation!r}: expected one of {list(AUGMENTATIONS)}")


def default_eval_resize(img_size: int) -> int:
    """The conventional resize before a centre crop: S / 0.875 (224 -> 256)."""
    return int(round(img_size / 0.875))


def eval_transform(img_size: int, resize: int | None = None) -> Transform:
    """Evaluation: shorter side -> `resize` (bicubic; default S / 0.875), centre crop S -> (3, S, S)."""
    resize = default_eval_resize(img_size) if resize is None else int(resize)
    if resize < img_size:
        raise ParamsError(
            f"eval resize {resize} is smaller than the crop {img_size} (probe.eval_resize, probe.img_size)"
        )
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            *_to_normalised_tensor(),
        ]
    )
