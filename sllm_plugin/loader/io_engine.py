"""Parallel reads over the compiled core: open files once, run units on worker threads.

Each worker calls `_fastio.read_chunk`, which releases the GIL for the pread and the checksum,
so N Python threads are N concurrent kernel reads. Completions are reported as they happen,
which is what lets the next stage (a device copy, vLLM's weight loader) start early.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .. import _fastio
from ..format.errors import FormatError
from ..format.reader import Checkpoint
from .plan import ReadUnit

#: Above this share of pages cached, a file is read through the page cache (memory speed);
#: below it, with O_DIRECT (disk speed without polluting the cache for other processes).
RESIDENT_THRESHOLD = 0.5


class ShortRead(FormatError):
    """A data file ended before a unit did (it shrank after validation): no bytes to check."""


class FileSet:
    """The data files of one load, each opened once, with O_DIRECT where it is wanted and works.

    `direct=None` decides per file from its page-cache residency; True asks for O_DIRECT
    everywhere it is supported (tmpfs and some network file systems refuse it: those files are
    read buffered, silently, since the bytes are the same); False never uses it.
    """

    def __init__(self, paths: dict[str, Path], direct: bool | None = None) -> None:
        self.paths = paths
        self._buffered: dict[str, int] = {}
        self._direct: dict[str, int] = {}
        self._all_resident = True
        try:
            for name, path in paths.items():
                # Validated as a regular file already; non-blocking and checked again, so a
                # FIFO swapped in since cannot hang the load.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
                self._buffered[name] = fd
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FormatError(f"{path}: data file is no longer a regular file")
                os.set_blocking(fd, True)
                resident = (_fastio.resident_fraction(fd, os.fstat(fd).st_size)
                            >= RESIDENT_THRESHOLD)
                self._all_resident = self._all_resident and resident
                want = direct
                if want is None:
                    want = not resident
                if want:
                    dfd = _open_direct(path)
                    if dfd is not None:
                        self._direct[name] = dfd
        except BaseException:
            self.close()
            raise

    @property
    def direct_files(self) -> int:
        return len(self._direct)

    @property
    def all_resident(self) -> bool:
        """Every file was found in the page cache when opened (auto mode read them buffered)."""
        return self._all_resident

    def read(
        self, unit: ReadUnit, addr: int, want_hash: bool, populate: bool = False
    ) -> tuple[int, int | None]:
        fd = self._direct.get(unit.file)
        path = str(self.paths[unit.file])
        if fd is not None:
            try:
                return _fastio.read_chunk(fd, addr, unit.length, unit.offset, want_hash, path,
                                          populate)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Opened fine but refuses direct reads (some FUSE/NFS setups): go buffered.
                self._direct.pop(unit.file, None)
        return _fastio.read_chunk(
            self._buffered[unit.file], addr, unit.length, unit.offset, want_hash, path, populate
        )

    def buffered_fd(self, name: str) -> int:
        return self._buffered[name]

    def read_buffered(
        self, unit: ReadUnit, addr: int, populate: bool = False
    ) -> tuple[int, int | None]:
        """Read through the page cache whatever the file's mode (for unaligned memory)."""
        return _fastio.read_chunk(self._buffered[unit.file], addr, unit.length, unit.offset,
                                  False, str(self.paths[unit.file]), populate)

    def close(self) -> None:
        for fd in [*self._buffered.values(), *self._direct.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._buffered.clear()
        self._direct.clear()

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def read_checked(
    files: FileSet, ckpt: Checkpoint, unit: ReadUnit, addr: int, *, fresh: bool = False
) -> None:
    """Read one unit to `addr`; a short read (ShortRead) or a checksum mismatch is a
    FormatError.

    `fresh`: the destination was never touched, so pre-fault it in one call (see read_chunk).
    """
    n, digest = files.read(unit, addr, unit.checksum is not None, fresh)
    if n != unit.length:
        hit = ckpt.tensors_in(unit.file, unit.offset + n, unit.offset + unit.length)
        names = ", ".join(repr(t.name) for t in hit[:3]) or "padding"
        raise ShortRead(
            f"{files.paths[unit.file]}: data file ended at byte {unit.offset + n}, expected "
            f"{unit.offset + unit.length} (truncated while loading; affects {names})"
        )
    if unit.checksum is not None and f"{digest:016x}" != unit.checksum:
        bad = corrupt_tensors(files, ckpt, unit)
        names = ", ".join(repr(name) for name in bad) or "none (the padding was hit)"
        raise FormatError(
            f"{files.paths[unit.file]}: checksum mismatch in chunk {unit.chunk} (bytes "
            f"{unit.offset}-{unit.offset + unit.length}): expected {unit.checksum}, got "
            f"{digest:016x}; corrupt tensor(s): {names}"
        )


def corrupt_tensors(files: FileSet, ckpt: Checkpoint, unit: ReadUnit) -> list[str]:
    """Which tensors in a chunk that failed its checksum are corrupt (by their own checksums).

    Runs only after a mismatch, so it may read each overlapping tensor whole.
    """
    import xxhash

    bad = []
    fd = files.buffered_fd(unit.file)
    for t in ckpt.tensors_in(unit.file, unit.offset, unit.offset + unit.length):
        h = xxhash.xxh3_64()
        for start in range(0, t.bytes, 64 * 1024 * 1024):
            h.update(os.pread(fd, min(64 * 1024 * 1024, t.bytes - start), t.offset + start))
        if h.hexdigest() != t.checksum:
            bad.append(t.name)
    return bad


def run_parallel(
    units: Sequence[ReadUnit], threads: int, work: Callable[[int, int, ReadUnit], None]
) -> Iterator[int]:
    """Run `work(worker_id, i, units[i])` on `threads` threads; yield each i as it completes.

    The first failure stops the other workers (after their current unit) and is raised here.
    Closing the iterator early also stops them; either way all threads are joined on exit.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(units)):
        todo.put(i)
    done: queue.SimpleQueue[int | BaseException] = queue.SimpleQueue()
    stop = threading.Event()

    def worker(worker_id: int) -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(worker_id, i, units[i])
            except BaseException as e:  # handed to the consumer, which re-raises it
                stop.set()
                done.put(e)
                return
            done.put(i)

    pool = [
        threading.Thread(target=worker, args=(k,), name=f"sllm-io-{k}", daemon=True)
        for k in range(max(1, min(threads, len(units))))
    ]
    for t in pool:
        t.start()
    try:
        for _ in range(len(units)):
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for t in pool:
            t.join()
