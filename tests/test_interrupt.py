"""Ctrl-C (issue 24 item 6): an interrupted `xtra` command ends with one line naming what it saved, read
from disk (exit status 130, no traceback): the newest pre-training checkpoint, through Lightning's own
shutdown; each probe job's state and its epochs; a preparation's last complete manifest."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_params
from tests.fixtures.pretrain import env_one_thread, prepare_small, tiny_params
from tests.probe.test_stage import build_inputs, make_params
from xtra.cli import main as xtra_main


@pytest.mark.timeout(240)
def test_ctrl_c_in_pretraining_names_the_newest_checkpoint(tmp_path: Path) -> None:
    """SIGINT to a running `xtra pretrain` once a checkpoint is on disk: Lightning shuts down, then one
    line names that checkpoint and the command that resumes from it."""
    prepared = prepare_small(tmp_path)
    path = write_params(tmp_path, tiny_params(tmp_path, prepared, epochs=500), prepared)
    command = [sys.executable, "-m", "xtra.cli", "pretrain", "m", "--params", str(path)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env_one_thread(), stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "models" / "m" / "checkpoints"
    deadline = time.monotonic() + 200
    while not list(checkpoints.glob("*/step-*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pre-training ended before a checkpoint was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    saved = sorted(checkpoints.glob("*/step-*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert last == f"interrupted: xtra pretrain: newest checkpoint {saved}; `xtra pretrain m` resumes from it"


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_probe_job_names_its_state_and_epochs(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C right after a probe job saved its first epoch: one line names the state file and its
    epochs; a preparation interrupted names the last complete manifest it kept."""
    import xtra.probe.job as job

    params = make_params(tmp_path, epochs=3)
    build_inputs(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    original = job.save_state

    def save_then_interrupt(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "save_state", save_then_interrupt)
    capsys.readouterr()
    argv = ["probe", "rand", "--params", str(path), "--benchmark", "bench_a", "--kind", "linear", "--no-ray"]
    assert xtra_main(argv) == 130
    err = capsys.readouterr().err
    state = tmp_path / "results" / "probe-state" / "rand" / "bench_a" / "linear.pt"
    assert state.is_file() and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: xtra probe: probe states {state} (1 epochs done); `xtra probe rand` resumes each at its epoch"
    )

    import xtra.data.prepare as prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare_dataset", interrupted)
    dataset = next(iter(params["datasets"]))
    assert xtra_main(["prepare", dataset, "--params", str(path), "--force"]) == 130
    manifest = Path(params["paths"]["prepared"]) / dataset / "manifest.json"
    assert manifest.is_file()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: xtra prepare: nothing of this run is kept (its .partial folder is removed by the next "
        f"run); {manifest} (the last complete preparation) is unchanged"
    )


class _CtrlCWhilePickled:
    """An object whose pickling sends this process SIGINT: a Ctrl-C in the middle of torch.save."""

    def __reduce__(self):
        signal.raise_signal(signal.SIGINT)
        return (dict, ())


def test_ctrl_c_during_a_checkpoint_write_lands_after_the_file_is_whole(tmp_path: Path) -> None:
    """The race CI met: SIGINT while torch's zip writer is mid-file surfaced as its RuntimeError
    ("unexpected pos"), exit 1 with a traceback. The interruption now arrives once the file is in place."""
    import torch

    from xtra.atomic import save_torch_atomic

    path = tmp_path / "step-000004.ckpt"
    with pytest.raises(KeyboardInterrupt):
        save_torch_atomic({"weights": torch.arange(4.0), "interrupt": _CtrlCWhilePickled()}, path)
    assert torch.equal(torch.load(path, weights_only=False)["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
