"""One storage tier: a directory of checkpoints with a byte capacity, LRU eviction and pins.

Each model is one checkpoint directory inside the tier (see `names.dir_name`), written in a
hidden staging directory and renamed into place (format.writer), so a directory that is
visible is complete. A small state file keeps pins and last-use times across restarts; on
start-up the tier validates every checkpoint it finds and removes what dead writers left.

The tier directory is private (0700, ours, see `private.ensure_private_dir`): one that another
user created or may write is refused at start-up, never adopted. What the tier holds is still
checked as hostile on every start: `rediscover` removes (or, failing that, moves aside) any
entry that is not a valid checkpoint made only of regular files, notes why, and never raises,
so a damaged tier never stops the node from starting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..format.errors import FormatError
from ..format.reader import open_model_checkpoints
from ..format.writer import _OLD_TAG, _STAGING_TAG, recover_destination
from .bandwidth import Bandwidth
from .names import InvalidModelName, dir_name, model_name
from .private import (
    NotRegular,
    UnsafeDirectory,
    ensure_private_dir,
    regular_tree,
    remove_tree,
    tree_bytes,
    write_atomic,
)

logger = logging.getLogger("sllm_plugin.store")
STATE_FILE = ".sllm-node-state.json"
#: An evicted copy, renamed away before it is removed; removed at start-up if we died first.
EVICTED_TAG = ".sllm-evicted-"
#: A bad entry that could not be removed, moved aside; removal is tried again at each start.
BAD_TAG = ".sllm-bad-"
_MAX_STATE_BYTES = 16 * 1024 * 1024
_MAX_NOTE_REASON = 400


class TierError(Exception):
    """A tier cannot do what was asked; `status` is the HTTP status that fits."""

    status = 409


class TierFull(TierError):
    status = 507


class TooLarge(TierError):
    status = 413


class NotInTier(TierError):
    status = 404


class UnsafeTier(TierError):
    """The tier directory is not safely the daemon's own (see private.ensure_private_dir)."""

    status = 500


@dataclass
class Entry:
    name: str
    bytes: int
    last_used: float
    pinned: bool = False
    in_use: int = 0  # replicas starting from this copy: it must not be evicted under them


class _Saved(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pinned: bool = False
    last_used: float


_STATE = TypeAdapter(dict[str, _Saved])


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files in a checkpoint directory (links neither followed nor
    counted)."""
    return tree_bytes(path)


class Tier:
    def __init__(self, name: str, path: Path, capacity: int, bandwidth: Bandwidth) -> None:
        self.name, self.path, self.capacity, self.bandwidth = name, path, int(capacity), bandwidth
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._reserved: dict[str, int] = {}  # in-flight writes: name -> bytes
        #: Told (tier, bytes, reason) of each copy evicted: reason "request" or "capacity".
        self.on_evict: Callable[[str, int, str], None] | None = None
        try:
            ensure_private_dir(self.path, f"the {name} tier")
        except UnsafeDirectory as e:
            raise UnsafeTier(str(e)) from None

    # -- start-up ---------------------------------------------------------------------

    def rediscover(self) -> list[str]:
        """Load what the tier holds; returns notes on what was removed and why. Never raises:
        whatever an entry holds, it is kept (a valid checkpoint), left alone (a name that is
        not ours), or removed (moved aside if it cannot be) with a note."""
        notes: list[str] = []
        saved = self._read_state(notes)
        # Hidden entries first: recovering what a dead writer left may put a checkpoint back
        # under its name, to be validated with the others in the second pass.
        for hidden in (True, False):
            for child in self._children(notes, hidden):
                try:
                    note = self._rediscover_one(child, saved)
                except Exception as e:  # noqa: BLE001 - whatever an entry does, the node starts
                    reason = str(e) if isinstance(e, FormatError) else f"{type(e).__name__}: {e}"
                    note = self._discard(child, reason)
                if note:
                    notes.append(note)
        with contextlib.suppress(OSError):
            leftovers = [c.name for c in self.path.iterdir()
                         if c.name.startswith(".") and _STAGING_TAG in c.name]
            notes += [f"{self.name}: {n} belongs to a live writer; left alone" for n in leftovers]
        self._write_state()
        for note in notes:
            logger.warning("%s", note)
        return notes

    def _children(self, notes: list[str], hidden: bool) -> list[str]:
        try:
            with os.scandir(self.path) as it:
                return sorted(e.name for e in it if e.name.startswith(".") == hidden)
        except OSError as e:
            notes.append(f"{self.name}: cannot list {self.path}: {e.strerror}")
            return []

    def _rediscover_one(self, child: str, saved: dict[str, _Saved]) -> str | None:
        """Keep, tidy or remove one entry of the tier; a note if the operator should know."""
        path = self.path / child
        st = os.lstat(path)
        if child == STATE_FILE:
            if not stat.S_ISREG(st.st_mode):
                return self._discard(child, "the state file is not a regular file")
            return None
        if child.startswith((".sllm-calibrate-", f"{STATE_FILE}.")):
            remove_tree(path)  # a calibration or state write cut short
            return None
        if child.startswith("."):
            return self._rediscover_hidden(child)
        try:
            name = model_name(child)
        except InvalidModelName:
            return (f"{self.name}: {child} is not a checkpoint of this node (not a model "
                    "directory name); left alone, not served")
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            return self._discard(child, f"{kind}, where a checkpoint directory belongs")
        try:
            files = regular_tree(path)
        except NotRegular as e:
            return self._discard(child, f"it holds {e.relative}, {e.kind} (a checkpoint holds "
                                 "regular files only)")
        open_model_checkpoints(path)  # any failure: discarded by the caller, with the reason
        meta = saved.get(name)
        self._entries[name] = Entry(name, sum(files.values()),
                                    meta.last_used if meta else st.st_mtime,
                                    meta.pinned if meta else False)
        return None

    def _rediscover_hidden(self, child: str) -> str | None:
        """Hidden entries: what our own writers and evictions leave, or not ours at all."""
        for tag in (_STAGING_TAG, _OLD_TAG):
            if tag in child:
                destination = child[1:].split(tag, 1)[0]
                try:
                    model_name(destination)
                except InvalidModelName:
                    return self._discard(child, f"left by a writer for {destination!r}, which "
                                         "is no model directory name")
                recover_destination(self.path / destination)
                return None
        for tag in (EVICTED_TAG, BAD_TAG):
            if tag in child:
                if remove_tree(self.path / child):
                    return None
                return f"{self.name}: {child} could not be removed; it is not served"
        return None  # hidden and not ours: neither served nor touched

    def _discard(self, child: str, reason: str) -> str:
        """Remove a bad entry (never through a link), or move it aside if it resists."""
        if len(reason) > _MAX_NOTE_REASON:
            reason = reason[:_MAX_NOTE_REASON] + "..."
        path = self.path / child
        if remove_tree(path):
            return f"{self.name}: removed {child}: {reason}"
        aside = f".{child}{BAD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(path, self.path / aside)
        except OSError as e:
            return (f"{self.name}: {child} is bad ({reason}) and could neither be removed nor "
                    f"moved aside ({e.strerror}); it is not served")
        return f"{self.name}: moved {child} aside as {aside} (it could not be removed): {reason}"

    # -- queries ----------------------------------------------------------------------

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def path_of(self, name: str) -> Path:
        return self.path / dir_name(name)

    def entries(self) -> list[Entry]:
        with self._lock:
            return [Entry(**asdict(e)) for e in self._entries.values()]

    def used(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values()) + sum(self._reserved.values())

    def size_of(self, name: str) -> int:
        with self._lock:
            return self._require(name).bytes

    # -- changes ----------------------------------------------------------------------

    def touch(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                self._entries[name].last_used = time.time()
                self._write_state()

    def pin(self, name: str, pinned: bool) -> None:
        with self._lock:
            self._require(name).pinned = pinned
            self._write_state()

    def acquire(self, name: str) -> Path:
        """Mark the copy in use (not evictable) and return its path."""
        with self._lock:
            entry = self._require(name)
            entry.in_use += 1
            entry.last_used = time.time()
            self._write_state()
            return self.path_of(name)

    def release(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                self._entries[name].in_use = max(0, self._entries[name].in_use - 1)

    def evict(self, name: str, force: bool = False, reason: str = "request") -> int:
        """Remove a model's copy; refused while pinned (unless `force`) or in use."""
        with self._lock:
            entry = self._require(name)
            if entry.in_use:
                raise TierError(f"{name} in the {self.name} tier is in use by "
                                f"{entry.in_use} starting replica(s)")
            if entry.pinned and not force:
                raise TierError(f"{name} is pinned in the {self.name} tier; unpin it first")
            del self._entries[name]
            self._write_state()
        self._remove_copy(name)
        logger.info("%s: evicted %s (%d bytes)", self.name, name, entry.bytes)
        if self.on_evict is not None:
            self.on_evict(self.name, entry.bytes, reason)
        return entry.bytes

    def store(self, name: str, nbytes: int, write: Callable[[Path], None]) -> Entry:
        """Make room for `nbytes` (evicting LRU), then `write(destination)` the checkpoint.

        `write` must create the directory atomically (staging + rename). On failure nothing is
        left and the reservation is returned.
        """
        with self._lock:
            if name in self._entries:
                return self._entries[name]
            self._make_room(name, nbytes)
            self._reserved[name] = nbytes
        destination = self.path_of(name)
        try:
            write(destination)
            actual = directory_bytes(destination)
        except BaseException:
            with self._lock:
                self._reserved.pop(name, None)
            recover_destination(destination)
            raise
        with self._lock:
            self._reserved.pop(name, None)
            if actual > nbytes:  # bigger than announced (side files, say): it counts all the same
                try:
                    self._make_room(name, actual)
                except TierError as e:
                    self._remove_copy(name)
                    raise TierFull(f"{name} took {actual} bytes on arrival, more than the "
                                   f"{nbytes} its source announced, and there is no room for "
                                   f"it: {e}") from None
            entry = Entry(name, actual, time.time())
            self._entries[name] = entry
            self._write_state()
        return entry

    # -- internals ----------------------------------------------------------------------

    def _require(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotInTier(f"{name} is not in the {self.name} tier")
        return entry

    def _make_room(self, name: str, nbytes: int) -> None:
        if nbytes > self.capacity:
            raise TooLarge(f"{name} needs {nbytes / 1e9:.3f} GB; the {self.name} tier holds "
                           f"{self.capacity / 1e9:.3f} GB in all")
        free = self.capacity - self.used()
        if free >= nbytes:
            return
        victims = sorted((e for e in self._entries.values() if not e.pinned and not e.in_use),
                         key=lambda e: e.last_used)
        chosen: list[Entry] = []
        for victim in victims:
            if free >= nbytes:
                break
            chosen.append(victim)
            free += victim.bytes
        if free < nbytes:
            held = [e.name for e in self._entries.values() if e.pinned or e.in_use]
            raise TierFull(
                f"{name} needs {nbytes / 1e9:.3f} GB in the {self.name} tier; only "
                f"{free / 1e9:.3f} GB can be freed (pinned or in use: {held})")
        for victim in chosen:
            self.evict(victim.name, reason="capacity")

    def _remove_copy(self, name: str) -> None:
        # Renamed away first, so the visible name disappears at once and atomically; replicas
        # that already mapped or opened the files keep reading them.
        doomed = self.path / f".{dir_name(name)}{EVICTED_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(self.path_of(name), doomed)
        remove_tree(doomed)

    def _read_state(self, notes: list[str]) -> dict[str, _Saved]:
        """Pins and last-use times saved by the last run; a state file that is not what we
        write (a link, huge, malformed) is noted and ignored, never fatal."""
        path = self.path / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            notes.append(f"{self.name}: state file {STATE_FILE} unreadable ({e.strerror}); "
                         "pins and last-use times start afresh")
            return {}
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            raw = os.read(fd, _MAX_STATE_BYTES + 1) if regular else b""
        except OSError:
            regular, raw = False, b""
        finally:
            os.close(fd)
        if not regular or len(raw) > _MAX_STATE_BYTES:
            notes.append(f"{self.name}: state file {STATE_FILE} is not a regular file of at "
                         f"most {_MAX_STATE_BYTES} bytes; pins and last-use times start afresh")
            return {}
        try:
            return _STATE.validate_json(raw)
        except (ValidationError, ValueError, RecursionError) as e:
            count = e.error_count() if isinstance(e, ValidationError) else 1
            notes.append(f"{self.name}: state file {STATE_FILE} is malformed ({count} "
                         "problem(s)); pins and last-use times start afresh")
            return {}

    def _write_state(self) -> None:
        """Save pins and last-use times: a new private file (mkstemp: O_EXCL|O_NOFOLLOW, 0600)
        renamed over the old one. A failure is logged, not raised: the state is advisory."""
        state = {e.name: {"pinned": e.pinned, "last_used": e.last_used}
                 for e in self._entries.values()}
        try:
            write_atomic(self.path / STATE_FILE,
                         _STATE.dump_json(_STATE.validate_python(state), indent=1),
                         prefix=f"{STATE_FILE}.")
        except OSError as e:
            logger.warning("%s: could not save the tier state (%s); pins and last-use times "
                           "will not survive a restart", self.name, e)
