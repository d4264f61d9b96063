"""The resumable state of a probe job: `results/probe-state/<model>/<benchmark>/<kinds>.pt`.

Written atomically (temporary file, then rename) after every epoch by rank 0: every kind's bank
(heads and shared normalisation statistics), its AdamW state, optimiser-step count and loss
history, the number of finished epochs, the environments of its segments so far
(`xtra.environment`: a job resumed in another environment records both), and the job's identity
(`xtra.probe.job.job_identity`: the probe recipe version, its params keys, the model's and the
dataset's identities). Nothing else
is needed to continue exactly: the batch order is a function of (seed, epoch), each sample's
augmentation of (seed, epoch, sample) and cached features are recomputed the same. Once the job has
evaluated, its state also keeps the finished results (`finish_state`), so a re-run of the finished
job writes the same result JSONs again without training or evaluating (`finished_results`).
A state of another identity (other params, model, data or recipe version) is never resumed or
reused; it is overwritten by the new job's first epoch. The folder is never a DVC or Snakemake
output (DVC would delete it before re-running the stage).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xtra.atomic import save_torch_atomic, write_atomic
from xtra.errors import CheckpointError, writing_to
from xtra.probe.config import ProbeConfig

__all__ = [
    "STATE_DIR",
    "state_path",
    "save_state",
    "load_state",
    "finish_state",
    "finished_results",
    "log_progress",
]

STATE_DIR = "probe-state"


def state_path(cfg: ProbeConfig) -> Path:
    return cfg.results / STATE_DIR / cfg.model / cfg.benchmark / f"{'+'.join(cfg.kinds)}.pt"


def save_state(
    path: Path, identity: str, epochs_done: int, trainers: dict[str, dict], environments: Sequence[dict] = ()
) -> None:
    """Write the state atomically; a full disk is an OutputError naming the state folder."""
    state = {"identity": identity, "epochs_done": epochs_done, "trainers": trainers, "environments": list(environments)}
    with writing_to(path.parent):
        save_torch_atomic(state, path)


def load_state(path: Path, identity: str) -> dict[str, Any] | None:
    """The saved state when it belongs to this job, else None (absent, other job, or unreadable)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        print(f"warning: probe state {path} cannot be read ({exc}); starting the job from epoch 0", flush=True)
        return None
    if not isinstance(state, dict) or state.get("identity") != identity:
        return None
    if "trainers" not in state or "epochs_done" not in state:
        raise CheckpointError(f"probe state {path} lacks 'trainers' or 'epochs_done'")
    return state


def finish_state(path: Path, identity: str, results: dict[str, dict]) -> None:
    """Keep the evaluated results of the job in its (trained) state, atomically."""
    state = load_state(path, identity)
    if state is None:
        raise CheckpointError(f"probe state {path} of job {identity[:12]} vanished before its results were kept")
    with writing_to(path.parent):
        save_torch_atomic({**state, "results": results}, path)


def finished_results(path: Path, identity: str) -> dict[str, dict] | None:
    """The results a finished job of this identity kept in its state; None when it has not finished."""
    state = load_state(path, identity)
    return None if state is None else state.get("results")


def log_progress(path: Path, line: str) -> None:
    """Append a line to the job's progress log beside its state (`<kinds>.log`)."""
    log = path.with_suffix(".log")
    before = log.read_text(encoding="utf-8") if log.is_file() else ""
    with writing_to(path.parent):
        write_atomic(log, before + line + "\n")  # whole or not at all, like every file of the job
