"""Atomic file writes (a temporary file beside the target, then a rename) and the sha256 of a file.

A reader (a later stage, DVC, Snakemake) never sees half a file, and a failed write leaves no
temporary file behind. Write errors stay the OSError they are; `xtra.errors.writing_to` turns the
disk-full kind into a message that names the output folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json_atomic", "save_torch_atomic", "sha256_file"]

Data = str | bytes | memoryview


def write_atomic(path: str | Path, data: Data) -> Path:
    """Write `data` to `path` atomically (an existing file's mode is kept); returns the path.

    The temporary name is `.<name>.<pid>.tmp`: hidden, and unique per process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as handle:
            handle.write(data)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, payload: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """`payload` as JSON (with a final newline), written atomically."""
    return write_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to a temporary file beside `path`, then rename; nothing is left on failure.

    The object is streamed into the file, never serialised in memory first: a ViT-H/14 training
    checkpoint (weights, gradients' AdamW moments: ~10 GB) would otherwise take its size again in
    host memory at every save. torch's writer reports a failed write as a RuntimeError; one whose
    cause is a full disk is raised as the OSError(ENOSPC) it is, which `xtra.errors.writing_to`
    turns into a message naming the output folder. A Ctrl-C during the write takes effect once the
    file is in place (`_ctrl_c_after`): a KeyboardInterrupt inside torch's zip writer would surface
    as its RuntimeError ("unexpected pos"), not as the interruption it is.
    """
    import torch  # here, so that the torch-free users of this module do not import it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _ctrl_c_after():
        try:
            try:
                with open(tmp, "wb") as handle:
                    torch.save(obj, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
            except RuntimeError as exc:
                if _disk_full(tmp):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
                raise
            if path.exists():
                shutil.copymode(path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """A SIGINT during the block is recorded, and delivered to the handler there was when it ends
    (only the main thread may set a handler; elsewhere, or under a handler set outside Python, as is)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (`hashlib.file_digest`: the standard library's chunked reader)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _disk_full(path: Path) -> bool:
    """Whether the file system holding `path` has no room left (the cause of a failed torch.save)."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)
