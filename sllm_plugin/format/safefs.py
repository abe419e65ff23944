"""Reading files that a hostile directory holds (a checkpoint, a source model).

A name in such a directory may be a symlink to anything the process can read (`/etc/shadow`,
another user's model), a symlink loop, a FIFO (opening or reading it blocks forever), a device,
or a file far larger than it should be. These helpers make every such case a FormatError naming
the file, before a byte is read:
- a symlink is followed only when a `root` directory is given and its target lies inside it;
  without a root no symlink is followed at all (O_NOFOLLOW);
- only regular files are opened: the type is checked with stat before the open (so a FIFO or
  a device is never opened) and again with fstat on the descriptor (so a swap in between is
  caught); the open is non-blocking and never takes a controlling terminal.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import FormatError

_OPEN_FLAGS = (os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
               | getattr(os, "O_NOCTTY", 0))


def real_directory(path: str | Path, what: str = "directory") -> Path:
    """The real path of a directory that must exist (symlinks in `path` itself are the caller's
    choice and are followed). Raises FormatError."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as e:
        raise FormatError(f"{path}: {what} cannot be resolved: {_reason(e)}") from None
    if not os.path.isdir(real):
        raise FormatError(f"{path}: not a directory")
    return Path(real)


def resolve_inside(path: Path, root: Path, what: str, container: str = "the checkpoint") -> Path:
    """The real path of `path`, which must exist and, symlinks followed, lie inside the real
    directory `root` (`container` names it in messages). Raises FormatError: missing, a
    dangling link, a link loop, outside."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        dangling = " (a dangling symlink)" if os.path.islink(path) else ""
        raise FormatError(f"{path}: {what} is missing{dangling}") from None
    except OSError as e:
        raise FormatError(f"{path}: {what} cannot be resolved: {_reason(e)}") from None
    if root not in real.parents:
        raise FormatError(f"{path}: {what} resolves outside {container} ({real})")
    return real


def stat_regular(path: Path, what: str, *, root: Path | None = None,
                 container: str = "the checkpoint") -> tuple[Path, os.stat_result]:
    """Check that `path` is a regular file (following symlinks only inside `root`, or none
    without one) and return its real path and stat. Opens nothing. Raises FormatError."""
    if root is not None:
        real = resolve_inside(path, root, what, container)
        try:
            st = os.stat(real, follow_symlinks=False)
        except OSError as e:
            raise FormatError(f"{path}: cannot stat {what}: {_reason(e)}") from None
    else:
        real = path
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise FormatError(f"{path}: {what} is missing") from None
        except OSError as e:
            raise FormatError(f"{path}: cannot stat {what}: {_reason(e)}") from None
        if stat.S_ISLNK(st.st_mode):
            raise FormatError(f"{path}: {what} is a symbolic link; refusing to follow it "
                              "(copy the file itself in its place)")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: {what} is not a regular file ({_kind(st.st_mode)})")
    return real, st


def open_regular(path: Path, what: str, *, root: Path | None = None,
                 container: str = "the checkpoint") -> int:
    """Open a regular file for reading under the rules of `stat_regular`; returns a descriptor
    the caller closes. Raises FormatError."""
    real, _ = stat_regular(path, what, root=root, container=container)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink after the stat
            raise FormatError(f"{path}: {what} is a symbolic link; refusing to follow it") from None
        raise FormatError(f"{path}: cannot open {what}: {_reason(e)}") from None
    return _regular_blocking(fd, path, what)


def _regular_blocking(fd: int, path: Path, what: str) -> int:
    """`fd` if what it opened is a regular file (made blocking again), else closed and a
    FormatError: the type is checked on the descriptor, so nothing swapped in counts."""
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"{path}: {what} is not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path, what: str) -> int:
    """Open a file already validated (by stat_regular) for reading, following links as that
    check allowed: non-blocking and re-checked with fstat, so a FIFO or device swapped in
    since can neither hang nor feed the reader. Returns a blocking descriptor."""
    try:
        fd = os.open(path, _OPEN_FLAGS & ~os.O_NOFOLLOW)
    except OSError as e:
        raise FormatError(f"{path}: cannot open {what}: {_reason(e)}") from None
    return _regular_blocking(fd, path, what)


def read_regular(path: Path, what: str, limit: int, *, root: Path | None = None,
                 container: str = "the checkpoint") -> bytes:
    """The whole content of a regular file of at most `limit` bytes. Raises FormatError."""
    fd = open_regular(path, what, root=root, container=container)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FormatError(f"{path}: {what} is {size} bytes, over the {limit}-byte limit")
        parts = []
        total = 0
        while total <= limit:
            piece = os.read(fd, min(limit + 1 - total, 16 * 1024 * 1024))
            if not piece:
                break
            parts.append(piece)
            total += len(piece)
        if total > limit:
            raise FormatError(f"{path}: {what} grew past the {limit}-byte limit while read")
        return b"".join(parts)
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {_reason(e)}") from None
    finally:
        os.close(fd)


def _reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop?)"
    return e.strerror or str(e)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return f"mode {mode:o}"

