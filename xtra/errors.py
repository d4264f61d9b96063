"""Errors a user can cause: the CLI prints their message without a traceback."""

__all__ = ["XtraError", "ParamsError", "CheckpointError", "DataError"]


class XtraError(Exception):
    """Base class of every error caused by user input (params, data, checkpoints)."""


class ParamsError(XtraError):
    """A params.yaml that does not validate; the message names the file and key."""


class CheckpointError(XtraError):
    """A checkpoint that cannot be loaded: truncated, wrong architecture, missing keys."""


class DataError(XtraError):
    """A dataset that cannot be read or prepared; the message names the file or sample."""
