"""Each tensor's own checksum, checked on bytes the loader already holds in memory.

Chunk checksums prove the data files hold what the writer wrote; they say nothing about the
index pointing at the right bytes. An index that swaps two same-size tensors' offsets passes
every chunk check and would load them swapped, so `verify` also hashes every tensor and
compares it with `tensors[].checksum`. Never a second read from disk: the hash runs over the
bytes where they landed, with the GIL released.

- `InPlaceChecks`: the bytes stay in memory (a CPU load): the worker that lands a tensor's
  last unit hashes the whole tensor in one call, before the tensor is handed out.
- `StreamedChecks`: each unit passes through a buffer that is reused (a CUDA load's pinned
  ring, `verify_checkpoint`'s scratch): each tensor is hashed piece by piece as its units pass.
  XXH3 streams in order only, so a worker holding a later piece of a tensor waits for the
  earlier one. That cannot deadlock: units are handed out in order, so the earliest unit in
  flight never waits, and a failed worker wakes every waiter (`abort`).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import xxhash

from .. import _fastio
from ..format.errors import FormatError
from ..format.index import TensorEntry, quote
from ..format.reader import Checkpoint
from .plan import LoadPlan, ReadUnit

#: XXH3-64 of no bytes: the checksum of every empty tensor.
EMPTY_CHECKSUM = xxhash.xxh3_64(b"").hexdigest()


def mismatch(ckpt: Checkpoint, t: TensorEntry, got: str) -> str:
    """The message for a tensor whose bytes do not hash to its recorded checksum."""
    return (
        f"{ckpt.file_paths.get(t.file, t.file)}: tensor {quote(t.name)} (bytes {t.offset}-"
        f"{t.offset + t.bytes}) does not match its own checksum: expected {t.checksum}, got "
        f"{got}; the data chunks there are intact, so the index points at the wrong bytes"
    )


def empty_tensor_errors(ckpt: Checkpoint) -> list[tuple[int, str]]:
    """Empty tensors are never read; their checksum must still be the hash of no bytes.
    Returns (position in index.tensors, message) for each that fails."""
    return [(pos, mismatch(ckpt, t, EMPTY_CHECKSUM)) for pos, t in enumerate(ckpt.index.tensors)
            if t.bytes == 0 and t.checksum != EMPTY_CHECKSUM]


def _segment(t: TensorEntry, unit: ReadUnit) -> tuple[int, int]:
    """The part of `t` that `unit` holds, as (file offset, length)."""
    start = max(t.offset, unit.offset)
    return start, min(t.offset + t.bytes, unit.offset + unit.length) - start


class InPlaceChecks:
    """Hash each tensor where it landed once its last unit is in; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, plan: LoadPlan, base: int) -> None:
        self._ckpt, self._plan, self._base = ckpt, plan, base
        self._remaining = list(plan.tensor_unit_count)
        self._lock = threading.Lock()
        errors = empty_tensor_errors(ckpt)
        if errors:
            raise FormatError(errors[0][1])

    def landed(self, i: int) -> None:
        """Unit i is in memory; check every tensor it completes. Raises FormatError."""
        done = []
        with self._lock:
            for pos in self._plan.unit_tensors[i]:
                self._remaining[pos] -= 1
                if self._remaining[pos] == 0:
                    done.append(pos)
        for pos in done:
            t = self._ckpt.index.tensors[pos]
            addr = self._base + self._plan.file_base[t.file] + t.offset
            got = f"{_fastio.xxh3_64(addr, t.bytes):016x}"
            if got != t.checksum:
                raise FormatError(mismatch(self._ckpt, t, got))


class StreamedChecks:
    """Hash each tensor piece by piece as its units pass through reused buffers."""

    def __init__(self, ckpt: Checkpoint, plan: LoadPlan) -> None:
        self._ckpt, self._plan = ckpt, plan
        tensors = ckpt.index.tensors
        self._next = [t.offset for t in tensors]  # file offset of the next piece to hash
        self._hashers: dict[int, xxhash.xxh3_64] = {}
        self._broken: set[int] = set()  # a piece never landed; reported elsewhere
        self._cv = threading.Condition()
        self._error: BaseException | None = None

    def unit(self, i: int, unit: ReadUnit, addr: int | None) -> list[tuple[int, str]]:
        """Hash the pieces of tensors that unit i holds at `addr` (None: the unit's bytes are
        not there, e.g. a short read, which its caller reports). Returns (position in
        index.tensors, message) for each tensor this unit completes that fails its checksum."""
        bad = []
        tensors: Sequence[TensorEntry] = self._ckpt.index.tensors
        for pos in self._plan.unit_tensors[i]:
            t = tensors[pos]
            start, length = _segment(t, unit)
            got = self._feed(pos, t, start, None if addr is None else
                             addr + (start - unit.offset), length)
            if got is not None and got != t.checksum:
                bad.append((pos, mismatch(self._ckpt, t, got)))
        return bad

    def abort(self, error: BaseException) -> None:
        """A worker failed: wake every waiter, which re-raises `error` rather than wait for a
        piece that will never come."""
        with self._cv:
            if self._error is None:
                self._error = error
            self._cv.notify_all()

    def _feed(self, pos: int, t: TensorEntry, start: int, addr: int | None,
              length: int) -> str | None:
        """Hash one piece in order; the digest once the tensor is complete, else None."""
        whole = start == t.offset and length == t.bytes
        if whole:  # the common case: the tensor lies in one unit; no state, no waiting
            if addr is None:
                return None
            return f"{_fastio.xxh3_64(addr, length):016x}"
        with self._cv:
            while self._next[pos] != start:
                if self._error is not None:
                    raise self._error
                self._cv.wait()
            hasher = self._hashers.get(pos)
            if hasher is None:
                hasher = self._hashers[pos] = xxhash.xxh3_64()
        # Only this thread may touch this tensor's hasher until _next moves on.
        if addr is None:
            broken = True
        else:
            broken = pos in self._broken
            if not broken:
                hasher.update((ctypes.c_char * length).from_address(addr))
        with self._cv:
            if broken:
                self._broken.add(pos)
            self._next[pos] = start + length
            self._cv.notify_all()
        if start + length < t.offset + t.bytes:
            return None
        with self._cv:
            del self._hashers[pos]
        return None if broken else hasher.hexdigest()
