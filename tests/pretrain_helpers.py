"""Helpers of the pre-training tests: a small prepared class-folder dataset, a tiny model, killed runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.conftest import demo_params, write_params
from tests.fixtures.base import write_image

# a very small XTRA at 16 px (4 x 4 patches, 2 x 2 blocks): drop path and pseudo-random orders on,
# so that every source of randomness takes part in the resume tests
TINY_ARCH = {
    "preset": "tiny",
    "width": 32,
    "depth": 2,
    "num_heads": 2,
    "img_size": 16,
    "patch_size": 4,
    "block_size": 2,
    "predictor_depth": 1,
    "predictor_width": 16,
    "predictor_num_heads": 2,
    "drop_path_rate": 0.2,
    "block_order": "pseudo_random",
    "attn_impl": "sdpa",
}

# SIGKILL every rank right after the checkpoint of step KILL_AFTER_STEP is on disk (Lightning's
# launcher re-runs this file for rank 1, so every rank is patched the same way)
KILLER = """
import os, signal, sys
from xtra.train import module
step = int(os.environ["KILL_AFTER_STEP"])
original = module.KeepCheckpoints._save_checkpoint
def save_then_die(self, trainer, filepath):
    original(self, trainer, filepath)
    if trainer.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
module.KeepCheckpoints._save_checkpoint = save_then_die
from xtra.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_small_folder_dataset(root: Path, train: int = 24, val: int = 4) -> Path:
    """A `custom` class-folder tree of 16x16 noise images: `train` images in 2 classes, `val` held out."""
    for split, count in (("train", train), ("val", val)):
        for n in range(count):
            write_image(root / split / f"c{n % 2}" / f"{split}{n}.png", size=(16, 16), seed=1000 * (split == "val") + n)
    return root


def tiny_params(tmp: Path, prepared: Path, **train: Any) -> dict[str, Any]:
    """A params dict with one model `m` (TINY_ARCH) pre-trained on the small dataset `small`."""
    params = demo_params()
    params["datasets"]["small"] = {
        "kind": "custom",
        "root": str(tmp / "raw_small"),
        "image_size": 16,
        "size_check": "warn",
        "num_workers": 1,
    }
    params["models"] = {
        "m": {
            "init": "pretrain",
            "dataset": "small",
            "eval_resize": 16,
            "arch": dict(TINY_ARCH),
            "train": {
                "epochs": 2,
                "batch_size": 4,
                "accelerator": "cpu",
                "num_workers": 0,
                "lr": 1e-3,
                "warmup_epochs": 0.5,
                "checkpoint_every_n_steps": 2,
                "log_every_n_steps": 1,
                "reconstruct_images": 0,
                **train,
            },
        }
    }
    return params


def prepare_small(tmp: Path) -> Path:
    """Prepare the small dataset into tmp/prepared; returns the prepared root."""
    from xtra.config import validate_params
    from xtra.data.prepare import prepare_dataset

    make_small_folder_dataset(tmp / "raw_small")
    params = validate_params(tiny_params(tmp, tmp / "prepared"))
    prepare_dataset("small", params["datasets"]["small"], tmp / "prepared")
    return tmp / "prepared"


def env_one_thread() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_pretrain(
    directory: Path,
    params: dict[str, Any],
    prepared: Path,
    kill_after: int | None = None,
    timeout: float = 240,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`xtra pretrain m` in `directory` (killed right after step `kill_after`'s checkpoint if given)."""
    path = write_params(directory, params, prepared)
    env = env_one_thread()
    if kill_after is None:
        cmd = [sys.executable, "-m", "xtra.cli", "pretrain", "m", "--params", str(path), *extra]
    else:
        killer = directory / "killer.py"
        killer.write_text(KILLER)
        env["KILL_AFTER_STEP"] = str(kill_after)
        cmd = [sys.executable, str(killer), "pretrain", "m", "--params", str(path), *extra]
    return subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    from xtra.model.artifact import read_model_artifact

    return read_model_artifact(directory / "models" / "m" / "model.pt").state_dict


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
