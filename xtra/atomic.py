"""Atomic file writes: a temporary file beside the target, then a rename.

A reader (a later stage, DVC, Snakemake) never sees half a file, and a failed write leaves no
temporary file behind. Write errors stay the OSError they are; `xtra.errors.writing_to` turns the
disk-full kind into a message that names the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

__all__ = ["write_atomic", "write_json_atomic"]

Data = Union[str, bytes, memoryview]


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
