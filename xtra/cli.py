"""The `xtra` command: one sub-command per pipeline stage, each in its own module.

A leaf: no module of the package imports it, and it imports a command's module only when that
command runs (`xtra --help` parses nothing else).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from xtra.errors import WRITE_ERRNOS, XtraError
from xtra.timelimit import RESUBMIT_EXIT, StopForResubmission, catch_stop_signals, ignore_stop_signals

__all__ = ["main", "COMMANDS", "STOP_SAFE"]

# sub-command -> (module, one-line help). Modules are imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("xtra.config", "validate params.yaml against the schema"),
    "profile": ("xtra.pipeline.profiles", "write a shipped profile (demo, paper_*, release_probe) to params.yaml"),
    "dag": ("xtra.pipeline.dag", "write dvc.yaml: the stage table of params.yaml (--check: is it current?)"),
    "prepare": ("xtra.data.prepare", "convert a raw dataset into checksummed WebDataset shards"),
    "pretrain": ("xtra.train.pretrain", "pre-train (or initialise) one model of params.yaml"),
    "probe": ("xtra.probe.cli", "probe one model's frozen encoder on its benchmarks"),
    "report": ("xtra.report.cli", "write result tables and figures"),
    "reconstruct": ("xtra.train.reconstruct", "PNG grid of input, target and predicted next blocks"),
    "convert-checkpoint": ("xtra.release.convert", "import a checkpoint of the public XTRA release"),
    "bench": ("xtra.bench.cli", "throughput benchmarks (GPU recipes, attention paths, data loading, probe sweep)"),
}


# The commands that save at the next step boundary on the scheduler's warning (xtra.timelimit): their
# stop signals are caught before the command's module (torch) is imported, since the warning may come early.
STOP_SAFE = ("pretrain",)


def _module_for(command: str):
    return importlib.import_module(COMMANDS[command][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtra", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module_for(name).configure_parser(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command in STOP_SAFE:
        catch_stop_signals()
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    module = _module_for(args.command)
    interrupted = []
    default_sigint = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # noqa: ANN001 - a signal handler
        interrupted.append(signum)
        raise KeyboardInterrupt

    # not when the caller handles Ctrl-C itself (or in a thread: only the main one may set a handler)
    if default_sigint is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    try:
        return int(module.run(args) or 0)
    except StopForResubmission as exc:
        print(f"stopped: {exc}; exit {RESUBMIT_EXIT}: run the same command again to continue", file=sys.stderr)
        return RESUBMIT_EXIT
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not interrupted:
            raise  # an exit of the command's own; after our SIGINT it is Lightning's sys.exit(1) once it shut down
        print(f"interrupted: xtra {args.command}: {what_was_saved(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except XtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        # a full disk, an exceeded quota or file-size limit: name the file, no traceback
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        if args.command in STOP_SAFE:
            ignore_stop_signals()  # done or saved: a late warning must not turn the exit status into a signal's
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, default_sigint)


def what_was_saved(args: argparse.Namespace) -> str:
    """What an interrupted command leaves on disk, read from there: the newest pre-training checkpoint,
    each probe job's state and its epochs, or that a preparation kept the last complete one."""
    params_file = getattr(args, "params", "params.yaml")
    try:
        from xtra.config import load_params

        paths = load_params(params_file, check_paths=False)["paths"]
    except XtraError:
        paths = None
    if args.command == "prepare" and paths:
        manifest = Path(paths["prepared"]) / args.dataset / "manifest.json"
        kept = f"{manifest} (the last complete preparation) is unchanged" if manifest.is_file() else "none was"
        return f"nothing of this run is kept (its .partial folder is removed by the next run); {kept}"
    if args.command == "pretrain" and paths:
        ckpts = (Path(paths["models"]) / args.model / "checkpoints").glob("*/step-*.ckpt")
        newest = max(ckpts, key=lambda p: p.stat().st_mtime, default=None)
        if newest is None:
            return f"no checkpoint saved yet; `xtra pretrain {args.model}` starts over"
        return f"newest checkpoint {newest}; `xtra pretrain {args.model}` resumes from it"
    if args.command == "probe" and paths:
        import torch

        from xtra.probe.state import STATE_DIR

        saved = []
        for path in sorted((Path(paths["results"]) / STATE_DIR / args.model).glob("*/*.pt")):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                done = "finished" if "results" in state else f"{state['epochs_done']} epochs done"
                saved.append(f"{path} ({done})")
            except (RuntimeError, EOFError, OSError, KeyError, TypeError):
                saved.append(f"{path} (unreadable: that job starts over)")
        if not saved:
            return f"no probe state saved yet; `xtra probe {args.model}` starts over"
        return f"probe states {'; '.join(saved)}; `xtra probe {args.model}` resumes each at its epoch"
    return "its files are written atomically: none is half-written; run it again"


if __name__ == "__main__":
    raise SystemExit(main())
