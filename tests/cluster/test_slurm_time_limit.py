"""A pre-training longer than its Slurm time limit, on the real one-node cluster: cut by the warning signal again
and again, it ends with the weights of an uninterrupted run (docs/pipeline.md, "Time limits").

2 CPU tasks (gloo) of the tiny model, 900 steps, no periodic checkpoint; each job `sbatch --signal=USR1@50`, its
command started by `srun` with the profile's layout and `XTRA_ATTEMPT` set as the workflow's rule sets it; a
job that exits 75 is submitted again (what Snakemake's `retries` do). The first two jobs get the warning a few
seconds into training from `scancel --signal=USR1` (delivered as the time limit's: to every process of the job
steps, not the batch shell), so that the test cuts at least twice whatever the machine's speed; the last job
finishes. Every cut must save the step reached (no step lost) and the final weights must equal an
uninterrupted run's.

The time limit's own warning was seen the same way by hand (`--time=1 --signal=USR1@50`, 900 steps: 7 cuts at
steps 354, 508, ..., 832, each saved in under 0.1 s, then finished, 0 weight difference). On this shared 2-core
machine it can also come during start-up (each job then trains 1 step) or not at all (a fast run), so the test
does not depend on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.slurm import SlurmCluster
from tests.conftest import write_params
from tests.fixtures.pretrain import env_one_thread, final_weights, max_weight_difference, prepare_small, tiny_params
from xtra.timelimit import RESUBMIT_EXIT

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

LAYOUT = "--nodes=1 --ntasks-per-node=2 --cpus-per-task=1"


def test_a_pretraining_cut_by_its_time_limit_ends_with_the_uninterrupted_weights(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    prepared = prepare_small(tmp_path)
    params = tiny_params(
        tmp_path, prepared, devices=2, strategy="ddp", batch_size=2, epochs=150, checkpoint_every_n_steps=100000
    )
    reference = tmp_path / "reference"
    reference.mkdir()
    path = write_params(reference, params, prepared)
    local = subprocess.run(
        [sys.executable, "-m", "xtra.cli", "pretrain", "m", "--params", str(path)],
        cwd=reference,
        env=env_one_thread(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert local.returncode == 0, local.stderr[-3000:]

    run = tmp_path / "run"
    run.mkdir()
    path = write_params(run, params, prepared)
    statuses = []
    for attempt in range(1, 13):
        script = run / "job.sh"
        script.write_text(
            f"#!/bin/bash\nexport XTRA_ATTEMPT={attempt}\n"
            f'srun {LAYOUT} {sys.executable} -m xtra.cli pretrain m --params {path}\necho "exit $?"\n'
        )
        submitted = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--time=10",
                "--signal=USR1@50",
                *LAYOUT.split(),
                f"--output={run}/job{attempt}.log",
                str(script),
            ],
            cwd=run,
            env=env_one_thread(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        job = submitted.stdout.strip()
        assert submitted.returncode == 0 and job, submitted.stderr
        if attempt <= 2:  # the warning, a few seconds into training
            output = run / f"job{attempt}.log"
            while job in slurm_cluster.job_ids() and "All distributed processes registered" not in (
                output.read_text(errors="replace") if output.exists() else ""
            ):
                time.sleep(1)
            time.sleep(5)
            subprocess.run(["scancel", "--signal=USR1", job], env=env_one_thread(), check=True, timeout=60)
        while job in slurm_cluster.job_ids():
            time.sleep(2)
        log = (run / f"job{attempt}.log").read_text(errors="replace")
        status = int(log.rsplit("exit ", 1)[1].split()[0]) if "\nexit " in log else None
        statuses.append(status)
        print(f"job {job} (attempt {attempt}): exit {status}")
        if status != RESUBMIT_EXIT:
            break
    assert statuses == [RESUBMIT_EXIT, RESUBMIT_EXIT, 0], statuses  # two cuts, then done
    (run_dir,) = (run / "models" / "m" / "checkpoints").iterdir()
    records = json.loads((run_dir / "attempts.json").read_text())
    for before, after in zip(records, records[1:]):
        assert before["outcome"] == "stopped" and before["signal"] == "SIGUSR1" and before["lost"] == 0, before
        assert after["start"] == before["end"] > before["start"]  # each attempt resumed where the last one saved
        print(f"attempt {before['attempt']}: steps {before['start']}-{before['end']}, saved in {before['save_s']} s")
    assert records[-1]["outcome"] == "finished" and records[-1]["end"] == 900
    assert max_weight_difference(final_weights(run), final_weights(reference)) == 0
