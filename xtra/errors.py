"""Errors a user can cause: the CLI prints their message without a traceback."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["XtraError", "ParamsError", "CheckpointError", "DataError", "OutputError", "WRITE_ERRNOS", "writing_to"]

# a full disk, an exceeded quota or file-size limit, a read-only file system
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class XtraError(Exception):
    """Base class of every error caused by user input (params, data, checkpoints)."""


class ParamsError(XtraError):
    """A params.yaml that does not validate; the message names the file and key."""


class CheckpointError(XtraError):
    """A checkpoint that cannot be loaded: truncated, wrong architecture, missing keys."""


class DataError(XtraError):
    """A dataset that cannot be read or prepared; the message names the file or sample."""


class OutputError(XtraError):
    """An output could not be written (disk full, quota, read-only); the message names the place."""


@contextmanager
def writing_to(place: str | Path) -> Iterator[None]:
    """Turn a write failure inside the block into an OutputError naming `place` (and the file)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        detail = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(f"cannot write to {place}: {exc.strerror or exc}{detail}") from exc
