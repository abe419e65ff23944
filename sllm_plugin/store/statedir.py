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
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LOCK_FILENAME = "lock"
_MAX_STATE_FILE = 16 * 1024 * 1024


class StateDirError(OSError):
    """The state directory cannot be used safely, or another daemon holds it; says why."""


def private_dir(path: Path, what: str) -> Path:
    """Create `path` 0700 (parents as usual), or adopt it if it is safely ours; returns it.

    Raises StateDirError naming `what` and the reason: a symbolic link, not a directory,
    owned by another user, writable by group or others, or inside a parent everyone may write
    without the sticky bit (anyone could rename ours away and put theirs in its place).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if path.is_symlink():
            raise StateDirError(f"{what} {path} is a symbolic link; configure the directory "
                                "it points to instead") from None
        if e.errno == errno.ENOTDIR:
            raise StateDirError(f"{what} {path} exists and is not a directory") from None
        raise StateDirError(f"{what} {path} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateDirError(f"{what} {path} belongs to uid {st.st_uid}, not to this user "
                                f"({os.geteuid()}); remove it or configure another path")
        if st.st_mode & 0o022:
            raise StateDirError(f"{what} {path} is writable by group or others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}); check what it holds, then "
                                "chmod 700 it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    parent = os.stat(path.parent)
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise StateDirError(f"{what} {path}: its parent {path.parent} is writable by everyone "
                            "without the sticky bit; use another path")
    return path


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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a new private temporary file beside it (mkstemp creates it
    0600 with O_EXCL, so never through a link or over another file), fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private(path: Path) -> bytes | None:
    """The bytes of the regular file `path` (not through a link), or None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StateDirError(f"{path} is not a regular file")
        data = f.read(_MAX_STATE_FILE + 1)
    if len(data) > _MAX_STATE_FILE:
        raise StateDirError(f"{path} is larger than {_MAX_STATE_FILE} bytes")
    return data


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what a killed daemon's `write_atomic` left (`.NAME.XXXX.tmp`)."""
    for leftover in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
