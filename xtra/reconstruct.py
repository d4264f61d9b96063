"""`xtra reconstruct`: a PNG grid of input, target and predicted next blocks for a few images.

Each row is one image: the input, the target (the image with its first block greyed, since block 0
is never predicted) and the prediction, where block m+1 is head 0's output at block m. With the
normalised-pixel loss the predictions are per-block standardised values: they are shown with the
target block's own mean and standard deviation put back, as is usual for such models.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import save_image

from xtra.errors import DataError
from xtra.model.xtra import XTRA, patchify_blocks, unpatchify_blocks

__all__ = ["reconstruction_grid", "reconstruction_grid_from_dataset", "load_model_file", "configure_parser", "run"]


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    from xtra.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model: XTRA, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (3B, 3, S, S) de-normalised rows: input, target, prediction."""
    model.eval()
    c = model.cfg.block_pixels
    blocks = patchify_blocks(images, c)  # (B, M, 3c^2)
    pred = model(images)[0].float()  # (B, M, 3c^2); pred[:, m] is block m+1
    if model.cfg.norm_pix_loss:
        mean = blocks.mean(-1, keepdim=True)
        std = torch.sqrt(blocks.var(-1, keepdim=True, unbiased=True) + 1e-6)
        pred[:, :-1] = pred[:, :-1] * std[:, 1:] + mean[:, 1:]
    shifted = torch.zeros_like(blocks)  # block 0 has no prediction: grey (0 in normalised space)
    shifted[:, 1:] = pred[:, :-1]
    target = blocks.clone()
    target[:, 0] = 0
    rows = [images, unpatchify_blocks(target, c), unpatchify_blocks(shifted, c)]
    return _denormalize(torch.stack(rows, dim=1).flatten(0, 1))  # (3B, 3, S, S)


def reconstruction_grid_from_dataset(model: XTRA, prepared: Path, out: Path, count: int, resize: int,
                                     split: str | None = None) -> Path:
    """Write the grid for the first `count` images of a prepared split (val if present, else train)."""
    from xtra.data.loaders import PreparedDataset, load_manifest
    from xtra.data.transforms import eval_transform

    splits = load_manifest(Path(prepared))["splits"]
    split = split or ("val" if "val" in splits else "test" if "test" in splits else "train")
    dataset = PreparedDataset(Path(prepared), split, eval_transform(model.cfg.img_size, resize))
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return _save(model, images, out)


def _save(model: XTRA, images: torch.Tensor, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    save_image(reconstruction_grid(model, images), tmp, nrow=3, padding=2, pad_value=1.0)
    tmp.replace(out)
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model file (models/<model>/model.pt) of a pre-trained or random model")
    parser.add_argument("images", nargs="*", help="image files; or use --dataset")
    parser.add_argument("--dataset", help="a prepared dataset folder (data/prepared/<name>)")
    parser.add_argument("--split", default=None, help="split of --dataset (default: val, else test, else train)")
    parser.add_argument("--count", type=int, default=8, help="images taken from --dataset (default 8)")
    parser.add_argument("--resize", type=int, default=None, help="evaluation resize before the centre crop")
    parser.add_argument("--out", required=True, help="PNG file to write")


def _load_images(paths: Sequence[str], img_size: int, resize: int | None) -> torch.Tensor:
    from xtra.data.transforms import eval_transform

    transform = eval_transform(img_size, resize)
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
    return torch.stack(tensors)


def load_model_file(path: str | Path) -> XTRA:
    """The full XTRA of a weights-only model file (`weights_only=True, mmap=True`), loaded strictly.

    An encoder-only file (a converted fine-tuned release) has no predictor or heads to reconstruct with.
    """
    from xtra.errors import CheckpointError
    from xtra.model.artifact import read_model_artifact
    from xtra.model.checkpoint import load_strict
    from xtra.model.xtra import ArchConfig

    artifact = read_model_artifact(path)
    if not artifact.state_dict or artifact.encoder_only:
        raise CheckpointError(f"{path}: init {artifact.init!r} holds no predictor and heads to reconstruct with")
    model = XTRA(ArchConfig.from_dict(artifact.arch))
    load_strict(model, artifact.state_dict, str(path))
    return model


def run(args: argparse.Namespace) -> int:
    model = load_model_file(args.checkpoint)
    resize = args.resize or model.cfg.img_size
    if args.dataset:
        out = reconstruction_grid_from_dataset(model, Path(args.dataset), Path(args.out), args.count, resize,
                                               args.split)
    elif args.images:
        out = _save(model, _load_images(args.images, model.cfg.img_size, resize), Path(args.out))
    else:
        raise DataError("give image files or --dataset")
    print(f"wrote {out}")
    return 0
