"""What a result was computed on, and the thread count as a setting (issue 26).

`environment(ranks, device)` is the one description of where a job runs: torch's intra-op `threads`
and `interop_threads`, the `ranks` of the job, the `device` type and its `device_name` (the CPU
model from /proc/cpuinfo, else the platform's; a GPU's name), the `torch` version, and on CUDA
the `cuda` and `cudnn` versions. These are what shape the low bits of a result that its identity
(params, recipe version, inputs) does not fix: the same identity in the same environment gives the
same bytes (measured: docs/pretraining.md, "Determinism").

A result records the environments of its *segments*: a job that resumes (a pre-training after a
kill, a probe job after a failed attempt) starts a segment, `{"from_step" | "from_epoch": n,
"environment": {...}}`, and `add_segment` keeps only those whose environment differs from the one
before, so an uninterrupted job and one resumed in the same environment record the same list (one
entry). A resume in another environment adds one and `changes` says what differs, for the log.

`apply_threads(threads)` sets torch's intra-op threads, the job's `resources.threads` (the demo and
the cluster profiles set it; null leaves torch's own choice: OMP_NUM_THREADS, else the cores it
sees). Each pre-training rank and each probe job (in this process, in each of its device processes,
in a Ray task) applies it itself, so the same command on the same machine type computes the same
bytes. It is never part of a result's identity: a job resumed under another count continues, and
its segments say so.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "device_name", "apply_threads", "add_segment", "changes"]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (/proc/cpuinfo's `model name`, else the platform's processor)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(ranks: int, device: torch.device | str) -> dict[str, Any]:
    """{threads, interop_threads, ranks, device, device_name, torch[, cuda, cudnn]} of this process."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "ranks": int(ranks),
        "device": device.type,
        "device_name": device_name(device),
        "torch": str(torch.__version__),  # a plain str (TorchVersion is no weights-only type)
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def apply_threads(threads: int | None) -> None:
    """torch's intra-op threads of this process: the job's `resources.threads` (None: torch's own choice).

    OMP_NUM_THREADS is set too: the processes this one starts (Lightning's DDP ranks) inherit it, and
    Lightning's launcher, which sets its own count (cores / processes) when the variable is absent,
    leaves it.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = str(int(threads))


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`field: old -> new` for every field that differs between two environments."""
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def add_segment(
    segments: list[dict[str, Any]], start_key: str, start: int, env: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The segments with one from `start` in `env` unless the last one ran in `env` already, and what
    changed from the last one's environment (empty when nothing did, or for the first segment)."""
    if segments and segments[-1]["environment"] == env:
        return list(segments), []
    changed = changes(segments[-1]["environment"], env) if segments else []
    return [*segments, {start_key: int(start), "environment": env}], changed
