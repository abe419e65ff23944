"""Private directories and files for the tiers, and trees walked and copied without links.

A tier's directory may sit where other users can create names (the default DRAM tier is in
/dev/shm: sticky and world-writable), and what it holds is mapped by replicas as model weights.
So a tier directory is created 0700, and an existing one is adopted only if it is a real
directory (not a link) owned by this user and writable by nobody else: a directory someone else
created first could hold a planted checkpoint, or let them swap ours. In a sticky parent nobody
else can rename or remove our directory once it is ours, so checking it once at start-up holds.

Files are created 0600 with O_EXCL|O_NOFOLLOW, and trees are walked and copied through
directory file descriptors (openat), never following a link and never opening anything but a
regular file: a link in a source could copy any file the daemon can read into a tier, a FIFO
would hang the copy, and /dev/zero would fill the disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_COPY_BLOCK = 16 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A regular file is opened with O_NONBLOCK so that, should a FIFO be swapped in between the
#: check and the open, the open returns at once (and fstat refuses it) rather than hanging.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 8
_MAX_STATE_FILE = 16 * 1024 * 1024


class UnsafeDirectory(OSError):
    """A directory the daemon would keep its data in is not safely its own; says why."""


class NotRegular(OSError):
    """A tree holds something other than regular files and directories (a link, a FIFO, a
    device, a socket); `relative` names it inside the tree."""

    def __init__(self, relative: str, kind: str) -> None:
        super().__init__(f"{relative} is {kind}")
        self.relative, self.kind = relative, kind


def ensure_private_dir(path: Path, what: str) -> Path:
    """Create `path` 0700 (its parents as usual), or adopt it if it is safely ours; returns it.

    Raises UnsafeDirectory naming `what` (e.g. "the dram tier") and the reason: a symbolic
    link, not a directory, owned by another user, writable by group or others, or in a parent
    that everyone may write without the sticky bit (anyone could replace it there). A directory
    of ours that others may only read (older versions made tiers 0755) is tightened to 0700.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if path.is_symlink():
            raise UnsafeDirectory(f"{what} {path} is a symbolic link; it must be a real "
                                  "directory (configure the path it points to instead)") from None
        if e.errno == errno.ENOTDIR:
            raise UnsafeDirectory(f"{what} {path} exists and is not a directory") from None
        raise UnsafeDirectory(f"{what} {path} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafeDirectory(
                f"{what} {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); "
                "someone else created it, so what it holds cannot be trusted: remove it or "
                "configure another path")
        if st.st_mode & 0o022:
            raise UnsafeDirectory(
                f"{what} {path} is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); check what it holds, then chmod 700 it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    parent = os.stat(path.parent)
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(
            f"{what} {path}: its parent {path.parent} is writable by everyone without the "
            "sticky bit, so anyone could replace it there; use another path")
    return path


def create_private_file(path: Path) -> int:
    """A new file, 0600, created with O_EXCL|O_NOFOLLOW (never an existing name or a link's
    target); returns the file descriptor, open for writing."""
    return os.open(path, _CREATE_FLAGS, 0o600)


def write_private_file(path: Path, data: bytes) -> None:
    """Write a new private file (see create_private_file) and fsync it."""
    fd = create_private_file(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes, prefix: str | None = None) -> None:
    """Replace `path` with `data`: a new private temporary file beside it (mkstemp creates it
    0600 with O_EXCL, so never through a link or over another file), fsynced, then renamed.
    The temporary file is named `prefix` (default `.NAME.`) + random + `.tmp`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.",
                               suffix=".tmp")
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
            raise UnsafeDirectory(f"{path} is not a regular file")
        data = f.read(_MAX_STATE_FILE + 1)
    if len(data) > _MAX_STATE_FILE:
        raise UnsafeDirectory(f"{path} is larger than {_MAX_STATE_FILE} bytes")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _walk(dir_fd: int, prefix: str, depth: int = 0) -> Iterator[tuple[str, int, os.stat_result]]:
    """(relative name, parent dir fd, lstat) of every entry below `dir_fd`, parents first.

    Sub-directories are opened with O_NOFOLLOW relative to their parent's descriptor, so a
    directory swapped for a link while we walk is refused, not followed. A checkpoint is two
    levels deep at most; a tree nested deeper than MAX_DEPTH is refused (NotRegular)."""
    if depth > MAX_DEPTH:
        raise NotRegular(prefix.rstrip("/"), f"nested more than {MAX_DEPTH} directories deep")
    with os.scandir(dir_fd) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        relative = f"{prefix}{name}"
        yield relative, dir_fd, st
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield from _walk(sub, f"{relative}/", depth + 1)
            finally:
                os.close(sub)


def regular_tree(root: Path) -> dict[str, int]:
    """Every regular file under `root` (relative name -> size), walked without following
    links. Raises NotRegular for the first entry that is neither a file nor a directory."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        files: dict[str, int] = {}
        for relative, _, st in _walk(fd, ""):
            if stat.S_ISREG(st.st_mode):
                files[relative] = st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                raise NotRegular(relative, _kind(st.st_mode))
        return files
    finally:
        os.close(fd)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root`, links not followed and not counted."""
    total = 0
    with contextlib.suppress(OSError):
        fd = os.open(root, _DIR_FLAGS)
        try:
            total = sum(st.st_size for _, _, st in _walk(fd, "") if stat.S_ISREG(st.st_mode))
        finally:
            os.close(fd)
    return total


def copy_tree(src: Path, dst: Path) -> int:
    """Copy the tree at `src` into the existing, empty directory `dst`: directories 0700,
    regular files 0600 and fsynced, nothing else (NotRegular names what was refused).

    Links are never followed: each file is opened relative to its directory's descriptor with
    O_NOFOLLOW, and what was opened must be a regular file. Returns the bytes copied."""
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dst_fds = {"": os.open(dst, _DIR_FLAGS)}
    copied = 0
    try:
        for relative, dir_fd, st in _walk(src_fd, ""):
            parent, _, name = relative.rpartition("/")
            out_dir = dst_fds[parent]
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=out_dir)
                dst_fds[relative] = os.open(name, _DIR_FLAGS, dir_fd=out_dir)
            elif stat.S_ISREG(st.st_mode):
                copied += _copy_file(dir_fd, name, out_dir, relative)
            else:
                raise NotRegular(relative, _kind(st.st_mode))
    finally:
        os.close(src_fd)
        for fd in dst_fds.values():
            os.close(fd)
    return copied


def _copy_file(src_dir: int, name: str, dst_dir: int, relative: str) -> int:
    try:
        fd_in = os.open(name, _READ_FLAGS, dir_fd=src_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:  # became a link after the walk looked at it
            raise NotRegular(relative, "a symbolic link") from None
        raise
    with os.fdopen(fd_in, "rb") as fin:
        mode = os.fstat(fin.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(relative, _kind(mode))
        os.set_blocking(fin.fileno(), True)
        fd_out = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dst_dir)
        with os.fdopen(fd_out, "wb") as fout:
            shutil.copyfileobj(fin, fout, _COPY_BLOCK)
            fout.flush()
            os.fsync(fout.fileno())
            return fout.tell()


def make_tree_private(root: Path) -> None:
    """Make a tree we just wrote 0700 (directories) and 0600 (files); links are left alone."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        os.fchmod(fd, 0o700)
        for relative, dir_fd, st in _walk(fd, ""):
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                name = relative.rpartition("/")[2]
                entry = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
                try:
                    os.fchmod(entry, 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)
                finally:
                    os.close(entry)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> bool:
    """Remove whatever is at `path` (a directory tree, a file, a link: never what a link points
    to), making unreadable directories readable first. True if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return not os.path.lexists(path)

    def retry(function, name, _exc_info) -> None:  # unreadable or unwritable: make it ours
        with contextlib.suppress(Exception):
            for directory in (os.path.dirname(name), name):
                if os.path.isdir(directory) and not os.path.islink(directory):
                    os.chmod(directory, 0o700)
            if function in (os.open, os.scandir, os.listdir):  # could not list it: again
                shutil.rmtree(name, ignore_errors=True)
            else:
                function(name)

    with contextlib.suppress(Exception):  # e.g. a tree nested too deep for the recursion
        shutil.rmtree(path, onerror=retry)
    return not os.path.lexists(path)
