"""The resumable state of a probe job: `results/probe-state/<model>/<benchmark>/<kinds>.pt`.

Written atomically (temporary file, then rename) after every epoch by rank 0: every kind's bank
(heads and shared normalisation statistics), its AdamW state, optimiser-step count and loss
history, the number of finished epochs, and the job's fingerprint. Nothing else is needed to
continue exactly: the batch order is a function of (seed, epoch), each sample's augmentation of
(seed, epoch, sample) and cached features are recomputed the same. A state whose fingerprint differs
(other params, checkpoint or data) is not resumed from; it is overwritten by the new job's first epoch.
The folder is never a DVC or Snakemake output (DVC would delete it before re-running the stage).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from xtra.atomic import save_torch_atomic, write_atomic
from xtra.config import params_hash
from xtra.errors import CheckpointError, writing_to
from xtra.probe.config import ProbeConfig

__all__ = ["STATE_DIR", "state_path", "job_fingerprint", "save_state", "load_state", "log_progress"]

STATE_DIR = "probe-state"


def state_path(cfg: ProbeConfig) -> Path:
    return cfg.results / STATE_DIR / cfg.model / cfg.benchmark / f"{'+'.join(cfg.kinds)}.pt"


# what a job may change and still continue from its state: devices (the result is the same up to
# summation order), loader workers, and where its folders are (the model and data are hashed)
NOT_IN_FINGERPRINT = ("devices", "num_workers", "model_dir", "prepared", "results")


def job_fingerprint(cfg: ProbeConfig, checkpoint_sha256: str, manifest_sha256: str) -> str:
    """What a resumed job must share with the one that saved the state (see NOT_IN_FINGERPRINT)."""
    payload = {k: v for k, v in cfg.as_dict().items() if k not in NOT_IN_FINGERPRINT}
    return params_hash({"config": payload, "checkpoint": checkpoint_sha256, "manifest": manifest_sha256})


def save_state(path: Path, fingerprint: str, epochs_done: int, trainers: dict[str, dict]) -> None:
    """Write the state atomically; a full disk is an OutputError naming the state folder."""
    with writing_to(path.parent):
        save_torch_atomic({"fingerprint": fingerprint, "epochs_done": epochs_done, "trainers": trainers}, path)


def load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state when it belongs to this job, else None (absent, other job, or unreadable)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        print(f"warning: probe state {path} cannot be read ({exc}); starting the job from epoch 0", flush=True)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        return None
    if "trainers" not in state or "epochs_done" not in state:
        raise CheckpointError(f"probe state {path} lacks 'trainers' or 'epochs_done'")
    return state


def log_progress(path: Path, line: str) -> None:
    """Append a line to the job's progress log beside its state (`<kinds>.log`)."""
    log = path.with_suffix(".log")
    before = log.read_text(encoding="utf-8") if log.is_file() else ""
    with writing_to(path.parent):
        write_atomic(log, before + line + "\n")  # whole or not at all, like every file of the job
