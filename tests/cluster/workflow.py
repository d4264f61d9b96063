"""Running the Snakemake front-end on the test cluster, and reading what it produced.

The command is docs/pipeline.md's, plus the two switches of a cluster without accounting (this one):
`--slurm-no-account` (there is no account to charge) and `--slurm-status-command squeue` (the
plugin's default status query, sacct, never sees a job finish without slurmdbd); the first status
check comes after 5 s instead of 40 (short test jobs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["SLURM_COMMAND", "snakemake_slurm", "final_weights", "max_weight_difference"]

BIN = Path(sys.executable).parent
SLURM_COMMAND = [
    "--profile",
    "workflow/profiles/slurm",
    "--slurm-no-account",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "5",
]


def snakemake_slurm(
    repo: Path, *args: str, timeout: float = 1800, log: Path | None = None
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`snakemake --profile workflow/profiles/slurm ...` in `repo` (the xtra command on PATH); with
    `log`, started in the background with its output going to that file (a Popen)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    command = [str(BIN / "snakemake"), *SLURM_COMMAND, *args]
    if log is not None:
        with log.open("w") as handle:
            return subprocess.Popen(command, cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights of a pre-training: models/<m>/model.pt (xtra.model.artifact), else the older last.ckpt."""
    from xtra.model.artifact import ARTIFACT_NAME, read_model_artifact

    if (model_dir / ARTIFACT_NAME).exists():
        return read_model_artifact(model_dir / ARTIFACT_NAME).state_dict
    from xtra.model.checkpoint import read_checkpoint

    ckpt: dict[str, Any] = read_checkpoint(model_dir / "last.ckpt")
    return ckpt["state_dict"]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b), f"different weight names: {sorted(set(a) ^ set(b))[:5]}"
    worst: float | None = 0.0
    for key in a:
        if a[key].is_floating_point():
            worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
        else:
            assert torch.equal(a[key], b[key]), key
    return worst
