"""The node daemon's state directory: private, held by one daemon, written atomically.

The state directory holds the daemon's token, its model registry (models.json), the pids of
the replicas it runs and their logs. So it is made 0700, and an existing one is used only if
it is a real directory (not a link) of this user that nobody else may write: a directory
another user made could hold a planted registry or token, or let them swap files under us.
A directory of ours that others may only read (older versions made it 0755) is tightened.

One daemon holds it at a time (an flock on `lock`, for the daemon's life): a second daemon on
the same directory would take the first one's replicas for leftovers and kill them. Files are
written to a fresh temporary file (mkstemp: O_EXCL, 0600) renamed over the old one, and read
without following links.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .private import UnsafeDirectory, ensure_private_dir, read_private, write_atomic

__all__ = ["StateDirError", "StateLock", "private_dir", "read_private",
           "remove_stale_temporaries", "write_atomic"]
LOCK_FILENAME = "lock"


class StateDirError(OSError):
    """The state directory cannot be used safely, or another daemon holds it; says why."""


def private_dir(path: Path, what: str) -> Path:
    """Create `path` 0700, or adopt it if it is safely ours (private.ensure_private_dir's
    rules); StateDirError says why not."""
    try:
        return ensure_private_dir(path, what)
    except UnsafeDirectory as e:
        raise StateDirError(str(e)) from None


class StateLock:
    """An exclusive flock on `<state_dir>/lock`, held until `release()` (or the process ends).

    The file descriptor is close-on-exec, so replicas the daemon starts never inherit (and
    never keep) the lock. The holder's pid is written in the file for the error a second
    daemon gives.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILENAME
        try:
            self._fd: int | None = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateDirError(f"{self.path}: cannot open the lock file ({e.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirError(
                f"the state directory {state_dir} is in use by another node daemon{who}; give "
                "each daemon its own state_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what a killed daemon's `write_atomic` left (`.NAME.<random>.tmp`)."""
    for leftover in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
