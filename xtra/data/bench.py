"""Data-loading throughput: a prepared dataset through the training loader vs the raw files.

Both paths use the same DataLoader (`make_loader`: seeded shuffle, same batch size and workers)
and the same transform; the raw path decodes each raw file (or array) and converts it to RGB as
preparation does, but without the resize, which is the work that preparation saves. The first
batch is not timed (worker start-up). The lead wires this as `xtra bench data`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset, Subset

from xtra.data.images import load_image, to_rgb
from xtra.data.loaders import PreparedDataset, make_loader
from xtra.data.source import Reader, Sample
from xtra.data.transforms import eval_transform, pretrain_transform, probe_train_transform
from xtra.errors import DataError, ParamsError

__all__ = ["RawImageDataset", "make_transform", "time_loader", "run_data_bench", "format_bench"]

TRANSFORMS: dict[str, Callable[[int], Callable]] = {
    "pretrain": pretrain_transform,
    "probe": probe_train_transform,
    "eval": lambda s: eval_transform(s),
}


class RawImageDataset(Dataset):
    """Raw samples decoded on the fly: item i -> (transform(RGB image), label)."""

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable[[Image.Image], Any]]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sample = self.samples[i]
        img = to_rgb(load_image(sample.image)[0])
        return (self.transform(img) if self.transform else img), int(sample.label)


def make_transform(name: str, img_size: int) -> Callable:
    """`pretrain` | `probe` | `eval` transform at img_size."""
    if name not in TRANSFORMS:
        raise ParamsError(f"unknown bench transform {name!r}; one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](img_size)


def time_loader(ds: Dataset, batch_size: int, num_workers: int, seed: int = 0) -> dict:
    """Images/s of one shuffled pass over ds, not timing the first batch."""
    loader = make_loader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=True, seed=seed)
    it = iter(loader)
    next(it)
    start, images = time.perf_counter(), 0
    for x, _ in it:  # x: (B, 3, S, S)
        images += int(x.shape[0])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0}


def run_data_bench(
    prepared_root: Path,
    raw_params: dict,
    split: str = "train",
    transform: str = "pretrain",
    img_size: Optional[int] = None,
    num_images: int = 2048,
    batch_size: int = 64,
    num_workers: int = 2,
    reader: Optional[Reader] = None,
) -> dict:
    """Throughput of `prepared_root` (a prepared dataset folder) vs its raw source; prints a table.

    `raw_params` is the dataset's params section (read with `xtra.data.readers.read_dataset`, or
    `reader`). Returns {"prepared": {...}, "raw": {...}, "ratio": prepared/raw images per s, ...}.
    """
    if reader is None:
        from xtra.data.readers import read_dataset as reader
    prepared = PreparedDataset(Path(prepared_root), split)
    size = int(img_size or prepared.manifest["params"].get("image_size") or 224)
    tf = make_transform(transform, size)
    prepared.transform = tf
    raw_samples = sorted(reader(raw_params).splits.get(split, []), key=lambda s: s.key)
    n = min(num_images, len(prepared), len(raw_samples))
    if n < 2 * batch_size:
        raise DataError(f"{prepared.name}/{split}: {n} images are too few to time batches of {batch_size}")
    results: dict = {
        "dataset": prepared.name, "split": split, "transform": transform, "img_size": size,
        "batch_size": batch_size, "num_workers": num_workers,
    }  # fmt: skip
    results["prepared"] = time_loader(Subset(prepared, range(n)), batch_size, num_workers)
    results["raw"] = time_loader(Subset(RawImageDataset(raw_samples, tf), range(n)), batch_size, num_workers)
    raw_rate = results["raw"]["images_per_s"]
    results["ratio"] = results["prepared"]["images_per_s"] / raw_rate if raw_rate else float("inf")
    print(format_bench(results))
    return results


def format_bench(results: dict) -> str:
    """The bench result as a text table."""
    lines = [
        f"data bench: {results['dataset']}/{results['split']}, transform {results['transform']} "
        f"{results['img_size']}px, batch {results['batch_size']}, {results['num_workers']} workers",
        f"  {'source':<10}{'images':>8}{'seconds':>10}{'images/s':>11}",
    ]
    for source in ("prepared", "raw"):
        r = results[source]
        lines.append(f"  {source:<10}{r['images']:>8}{r['seconds']:>10.2f}{r['images_per_s']:>11.0f}")
    lines.append(f"  ratio prepared/raw: {results['ratio']:.2f}x")
    return "\n".join(lines)
