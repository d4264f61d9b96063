"""The `xtra` command: one sub-command per pipeline stage, each in its own module.

A leaf: no module of the package imports it, and it imports a command's module only when that
command runs (`xtra --help` parses nothing else).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from xtra.errors import WRITE_ERRNOS, XtraError
from xtra.timelimit import RESUBMIT_EXIT, StopForResubmission, catch_stop_signals, ignore_stop_signals

__all__ = ["main", "COMMANDS", "STOP_SAFE"]

# sub-command -> (module, one-line help). Modules are imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("xtra.config", "validate params.yaml against the schema"),
    "profile": ("xtra.pipeline.profiles", "write a shipped profile (demo, paper_b16, paper_h14) to params.yaml"),
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
    try:
        return int(module.run(args) or 0)
    except StopForResubmission as exc:
        print(f"stopped: {exc}; exit {RESUBMIT_EXIT}: run the same command again to continue", file=sys.stderr)
        return RESUBMIT_EXIT
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


if __name__ == "__main__":
    raise SystemExit(main())
