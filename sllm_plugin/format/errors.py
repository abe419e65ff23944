"""The format's exceptions. One type, FormatError, covers every way a checkpoint can be invalid."""

from __future__ import annotations


class FormatError(ValueError):
    """A checkpoint (or a source model) is malformed, corrupt, or of a version we cannot read.

    The message always names the offending file and, where one is involved, the tensor.
    """


class CheckpointExistsError(FileExistsError):
    """The destination already holds a checkpoint and overwriting was not asked for."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions...); nothing partial was left behind."""
