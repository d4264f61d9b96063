"""Jobs that meet their time limit (xtra.timelimit): a pre-training sent the scheduler's warning signal saves
at the step it is at and exits 75; run again, it ends with the weights of a run never interrupted. A job run
again by the front-end without progress since its previous attempt stops with the no-progress error (exit 2).

Each run here is a process (~10 s); those beyond the 1-process SIGUSR1 case are marked `slow`.
The tiny run of tests/train/test_resume.py: 12 steps, a periodic checkpoint every 2 steps. The signal is sent
with os.kill by the process to itself (so that it comes at a known step) right before the step's end-of-batch
work; in the 2-process run only rank 1 gets it, and both ranks must stop at that step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_params
from tests.fixtures.pretrain import env_one_thread, final_weights, max_weight_difference, tiny_params
from xtra.timelimit import RESUBMIT_EXIT, AttemptLog, NoProgressError

# Lightning's launcher re-runs this file for rank 1, so every rank is patched the same way; SIGNAL_RANK: the
# rank that gets the signal (every rank when unset); DIE: SIGKILL instead (an attempt killed before any save)
SENDER = """
import os, signal, sys
from xtra.train import checkpoints
step, name = int(os.environ["SIGNAL_AT_STEP"]), os.environ["SIGNAL"]
rank = os.environ.get("SIGNAL_RANK")
original = checkpoints.KeepCheckpoints.on_train_batch_end
def signal_then_end_batch(self, trainer, *args):
    if trainer.global_step == step and rank in (None, str(trainer.global_rank)):
        os.kill(os.getpid(), getattr(signal, name))
    original(self, trainer, *args)
checkpoints.KeepCheckpoints.on_train_batch_end = signal_then_end_batch
from xtra.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _pretrain(directory: Path, params: dict, prepared: Path, signal_at: tuple[int, str] | None = None, **env: str):
    path = write_params(directory, params, prepared)
    full = {**env_one_thread(), **env}
    cmd = [sys.executable, "-m", "xtra.cli"]
    if signal_at:
        (directory / "sender.py").write_text(SENDER)
        full.update(SIGNAL_AT_STEP=str(signal_at[0]), SIGNAL=signal_at[1])
        cmd = [sys.executable, str(directory / "sender.py")]
    return subprocess.run(
        [*cmd, "pretrain", "m", "--params", str(path)],
        cwd=directory,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _attempts(directory: Path) -> list[dict]:
    (run_dir,) = (directory / "models" / "m" / "checkpoints").iterdir()
    return json.loads((run_dir / "attempts.json").read_text())


def _steps(directory: Path) -> list[int]:
    (run_dir,) = (directory / "models" / "m" / "checkpoints").iterdir()
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("step-*.ckpt"))


@pytest.fixture(scope="module")
def reference() -> dict[int, dict]:
    """The uninterrupted run's final weights, by rank count (filled on first use)."""
    return {}


def _reference_weights(reference, small, tmp_path_factory, ranks: int) -> dict:
    if ranks not in reference:
        tmp, prepared = small
        directory = tmp_path_factory.mktemp(f"reference{ranks}")
        proc = _pretrain(directory, _params(small, ranks), prepared)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reference[ranks] = final_weights(directory)
    return reference[ranks]


def _params(small, ranks: int) -> dict:
    tmp, prepared = small
    if ranks == 1:
        return tiny_params(tmp, prepared)
    return tiny_params(tmp, prepared, devices=ranks, strategy="ddp", batch_size=2)  # 6 batches a rank an epoch


@pytest.mark.parametrize(
    "ranks, signal, signal_rank",
    [
        (1, "SIGUSR1", None),
        pytest.param(1, "SIGTERM", None, marks=pytest.mark.slow),
        pytest.param(2, "SIGUSR1", "1", marks=pytest.mark.slow),
    ],
    ids=["1-process-SIGUSR1", "1-process-SIGTERM", "2-process-gloo-SIGUSR1-on-rank-1"],
)
def test_a_signalled_pretraining_saves_its_step_exits_75_and_resumes_to_the_uninterrupted_weights(
    small, reference, tmp_path_factory, tmp_path: Path, ranks: int, signal: str, signal_rank: str | None
) -> None:
    tmp, prepared = small
    params = _params(small, ranks)
    env = {"SIGNAL_RANK": signal_rank} if signal_rank else {}
    stopped = _pretrain(tmp_path, params, prepared, signal_at=(3, signal), **env)  # step 3: no periodic save there
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == RESUBMIT_EXIT, log[-3000:]
    assert "saved step 3 to" in log and "steps lost: 0" in log, log[-3000:]
    assert _steps(tmp_path) == [2, 3]  # the periodic save of step 2, and the step the signal came in
    assert not (tmp_path / "models" / "m" / "model.pt").exists()
    (record,) = _attempts(tmp_path)
    assert (record["start"], record["outcome"], record["end"], record["lost"]) == (0, "stopped", 3, 0)
    assert record["signal"] == (signal if ranks == 1 else "another rank's")  # rank 0 records; rank 1 got it
    print(f"{ranks} process(es), {signal}: saved step 3 in {record['save_s']} s")

    resumed = _pretrain(tmp_path, params, prepared, XTRA_ATTEMPT="2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000003.ckpt" in resumed.stdout and "attempt 1: from step 0: stopped by" in resumed.stdout
    difference = max_weight_difference(
        final_weights(tmp_path), _reference_weights(reference, small, tmp_path_factory, ranks)
    )
    assert difference == 0, difference
    assert [r["outcome"] for r in _attempts(tmp_path)] == ["stopped", "finished"]
    steps = [int(line.split(",")[0]) for line in (tmp_path / "models" / "m" / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13))  # no step lost, none taken twice


@pytest.mark.slow  # 3 runs (~40 s here); the decision itself: test_attempt_log_refuses_only_...
def test_a_resubmitted_pretraining_without_progress_stops_with_the_no_progress_error(small, tmp_path: Path) -> None:
    tmp, prepared = small
    params = tiny_params(tmp, prepared)
    killed = _pretrain(tmp_path, params, prepared, signal_at=(1, "SIGKILL"))  # killed before its first save
    assert killed.returncode == -9 and _steps(tmp_path) == []
    (record,) = _attempts(tmp_path)
    assert record["start"] == 0 and "outcome" not in record

    again = _pretrain(tmp_path, params, prepared, XTRA_ATTEMPT="2")
    assert again.returncode == 2, again.stderr[-3000:]
    assert "xtra pretrain m: no progress since the previous attempt: attempt 1 started at step 0" in again.stderr
    assert "was killed before it could record its end" in again.stderr and "attempt 2 of the front-end" in again.stderr
    assert len(_attempts(tmp_path)) == 1  # refused before it began: nothing recorded

    by_hand = _pretrain(tmp_path, params, prepared)  # no XTRA_ATTEMPT: a person re-running it is never refused
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert [r.get("outcome") for r in _attempts(tmp_path)] == [None, "finished"]


def test_attempt_log_refuses_only_a_front_end_retry_from_the_same_start(tmp_path: Path, monkeypatch) -> None:
    log = AttemptLog(tmp_path / "attempts.json", "step", "xtra pretrain m")
    log.begin(0)
    log.end("stopped", 40, signal="SIGUSR1", lost=0)
    monkeypatch.setenv("XTRA_ATTEMPT", "2")
    log.check_progress(40)  # it progressed: 0 -> 40
    log.begin(40)
    log.end("failed", 40, error="RuntimeError: boom")
    monkeypatch.setenv("XTRA_ATTEMPT", "3")
    with pytest.raises(NoProgressError, match="attempt 2 started at step 40 and failed without saving a later one"):
        log.check_progress(40)
    monkeypatch.setenv("XTRA_ATTEMPT", "1")  # a new front-end run (a fix, a new `snakemake` call)
    log.check_progress(40)
    monkeypatch.delenv("XTRA_ATTEMPT")
    log.check_progress(40)
    log.begin(40)
    log.end("finished", 80)
    monkeypatch.setenv("XTRA_ATTEMPT", "4")
    log.check_progress(80)  # the last attempt finished: a re-run only rewrites the final files
    assert log.history() == [
        "attempt 1: from step 0: stopped by SIGUSR1, saved step 40, lost 0",
        "attempt 2: from step 40: failed at step 40",
        "attempt 3: from step 40: finished at step 80",
    ]


def test_a_job_with_nothing_to_train_is_ended_by_the_signal_as_without_xtra(tmp_path: Path) -> None:
    """`xtra pretrain` catches the signals from its start, but a model that is not trained (init: random,
    official, pixels, backbone) gives them back: SIGTERM ends it at once (one that came earlier too)."""
    script = (
        "import os, signal, sys\n"
        "from xtra import timelimit\n"
        "timelimit.catch_stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert timelimit.stop_signal() == 'SIGTERM'\n"
        "timelimit.release_stop_signals()\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -15, proc.stderr  # ended by SIGTERM, not by the exit(3) after it


def test_the_signals_are_ignored_once_the_command_returned(tmp_path: Path) -> None:
    """Python gives caught signals their default action back while it shuts down: a warning coming right after
    a run finished ended it with 138 (SIGUSR1) on Slurm. Once `xtra pretrain` returned (done, or saved and 75),
    SIGUSR1 and SIGTERM are ignored, which Python's shutdown leaves as it is."""
    script = (
        "import signal, sys\n"
        "from xtra import cli\n"
        "class Done:\n"
        "    run = staticmethod(lambda args: 0)\n"
        "cli._module_for = lambda command: Done\n"  # the command's work itself does not matter here
        "cli.build_parser = lambda command: type('P', (), {'parse_args': lambda self, argv: Done})()\n"
        "Done.command = 'pretrain'\n"
        "assert cli.main(['pretrain']) == 0\n"
        "assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
