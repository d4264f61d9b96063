"""`xtra reconstruct`: a PNG grid of input, target and predicted next blocks for a few images.

Each row is one image: the input, the target (the image with the first block *of the model's block
order* greyed, since it is never predicted) and the prediction, where the block of rank r+1 is head
0's output at the block of rank r. A raster model's order is 0, 1, ..., M-1; a pseudo-random-order
model is drawn in its first permutation, the one probing uses, under the mask of that order. With the
normalised-pixel loss the predictions are per-block standardised values: they are shown with the
target block's own mean and standard deviation put back, as is usual for such models.

From a prepared dataset the images are of distinct classes: the first image of each class in class
order (then the second of each, and so on, when more images than classes are asked for).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from xtra.errors import DataError
from xtra.model.xtra import XTRA, patchify_blocks, unpatchify_blocks
from xtra.train.config import PretrainConfig

__all__ = [
    "reconstruction_grid",
    "reconstruction_grid_from_dataset",
    "distinct_class_indices",
    "write_model_reconstruction",
    "load_model_file",
    "configure_parser",
    "run",
]


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # what eval_transform uses

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def _model_order(model: XTRA) -> tuple[int, ...] | None:
    """The block order the model is drawn in: its first permutation (probing's), None for raster."""
    return tuple(model.block_orders[0]) if model.block_orders else None


@torch.no_grad()
def reconstruction_grid(model: XTRA, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (3B, 3, S, S) de-normalised rows: input, target, prediction.

    Blocks follow the model's own order (see the module doc): pred at the block of rank r is drawn
    at the block of rank r+1; the first block of the order is grey in the target and prediction.
    """
    model.eval()
    c = model.cfg.block_pixels
    blocks = patchify_blocks(images, c)  # (B, M, 3c^2), raster block positions
    order = _model_order(model)
    pred = model(images, order)[0].float()  # (B, M, 3c^2); pred[:, order[r]] is block order[r+1]
    ranked = torch.as_tensor(order if order is not None else range(blocks.shape[1]))  # (M,)
    src, dst = ranked[:-1], ranked[1:]
    shifted = torch.zeros_like(blocks)  # the first block has no prediction: grey (0 normalised)
    shifted[:, dst] = pred[:, src]
    if model.cfg.norm_pix_loss:
        mean = blocks.mean(-1, keepdim=True)
        std = torch.sqrt(blocks.var(-1, keepdim=True, unbiased=True) + 1e-6)
        shifted[:, dst] = shifted[:, dst] * std[:, dst] + mean[:, dst]
    target = blocks.clone()
    target[:, ranked[0]] = 0
    rows = [images, unpatchify_blocks(target, c), unpatchify_blocks(shifted, c)]
    return _denormalize(torch.stack(rows, dim=1).flatten(0, 1))  # (3B, 3, S, S)


def distinct_class_indices(targets: np.ndarray, count: int) -> list[int]:
    """`count` sample indices of distinct classes: the first of each class in class order, then
    the second of each, and so on. (N,) labels -> a list of at most min(count, N) indices."""
    targets = np.asarray(targets)
    per_class = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    picked: list[int] = []
    for depth in range(max((len(ix) for ix in per_class), default=0)):
        picked += [int(ix[depth]) for ix in per_class if depth < len(ix)]
        if len(picked) >= count:
            break
    return picked[:count]


def reconstruction_grid_from_dataset(
    model: XTRA, prepared: Path, out: Path, count: int, resize: int, split: str | None = None
) -> Path:
    """Write the grid for `count` images of distinct classes of a prepared split (val if present,
    else test, else train)."""
    from xtra.data.prepared import PreparedDataset, load_manifest
    from xtra.data.transforms import eval_transform

    splits = load_manifest(Path(prepared))["splits"]
    split = split or ("val" if "val" in splits else "test" if "test" in splits else "train")
    dataset = PreparedDataset(Path(prepared), split, eval_transform(model.cfg.img_size, resize))
    images = torch.stack([dataset[i][0] for i in distinct_class_indices(dataset.targets, count)])
    return _save(model, images, out)


def write_model_reconstruction(cfg: PretrainConfig, model: XTRA) -> Path | None:
    """`reconstruction.png` in the model's folder (a trained model and the random control alike) from
    its dataset; None (nothing written) when `train.reconstruct_images` is 0 or the dataset is not
    prepared (which a trained model's stage has checked before)."""
    count = cfg.train.reconstruct_images
    if count <= 0:
        return None
    if not (cfg.prepared / "manifest.json").is_file():  # a control whose dataset is not prepared here
        print(f"{cfg.model}: no reconstruction.png: {cfg.prepared} is not a prepared dataset")
        return None
    return reconstruction_grid_from_dataset(model, cfg.prepared, cfg.out / "reconstruction.png", count, cfg.eval_resize)


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

    An encoder-only file (a converted fine-tuned release) has no predictor or pixel heads to reconstruct with.
    """
    from xtra.errors import CheckpointError
    from xtra.model.artifact import read_model_artifact
    from xtra.model.checkpoint import load_strict
    from xtra.model.xtra import ArchConfig

    artifact = read_model_artifact(path)
    if not artifact.state_dict or artifact.encoder_only:
        raise CheckpointError(f"{path}: init {artifact.init!r} holds no predictor and pixel heads to reconstruct with")
    model = XTRA(ArchConfig.from_dict(artifact.arch))
    load_strict(model, artifact.state_dict, str(path))
    return model


def run(args: argparse.Namespace) -> int:
    model = load_model_file(args.checkpoint)
    resize = args.resize or model.cfg.img_size
    if args.dataset:
        out = reconstruction_grid_from_dataset(
            model, Path(args.dataset), Path(args.out), args.count, resize, args.split
        )
    elif args.images:
        out = _save(model, _load_images(args.images, model.cfg.img_size, resize), Path(args.out))
    else:
        raise DataError("give image files or --dataset")
    print(f"wrote {out}")
    return 0
