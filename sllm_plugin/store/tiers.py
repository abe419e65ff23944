"""One storage tier: a directory of checkpoints with a byte capacity, LRU eviction and pins.

Each model is one checkpoint directory inside the tier (see `names.dir_name`), written in a
hidden staging directory and renamed into place (format.writer), so a directory that is
visible is complete. A small state file keeps pins and last-use times across restarts; on
start-up the tier validates every checkpoint it finds and removes what dead writers left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..format.errors import FormatError
from ..format.reader import open_model_checkpoints
from ..format.writer import _OLD_TAG, _STAGING_TAG, recover_destination
from .bandwidth import Bandwidth
from .names import InvalidModelName, dir_name, model_name

logger = logging.getLogger("sllm_plugin.store")
STATE_FILE = ".sllm-node-state.json"


class TierError(Exception):
    """A tier cannot do what was asked; `status` is the HTTP status that fits."""

    status = 409


class TierFull(TierError):
    status = 507


class TooLarge(TierError):
    status = 413


class NotInTier(TierError):
    status = 404


@dataclass
class Entry:
    name: str
    bytes: int
    last_used: float
    pinned: bool = False
    in_use: int = 0  # replicas starting from this copy: it must not be evicted under them


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Tier:
    def __init__(self, name: str, path: Path, capacity: int, bandwidth: Bandwidth) -> None:
        self.name, self.path, self.capacity, self.bandwidth = name, path, int(capacity), bandwidth
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._reserved: dict[str, int] = {}  # in-flight writes: name -> bytes
        self.path.mkdir(parents=True, exist_ok=True)

    # -- start-up ---------------------------------------------------------------------

    def rediscover(self) -> list[str]:
        """Load what the tier holds; returns notes on what was removed and why."""
        notes: list[str] = []
        saved = self._read_state()
        for child in sorted(self.path.iterdir()):
            if child.name.startswith((".sllm-calibrate-", f"{STATE_FILE}.")):
                child.unlink(missing_ok=True)  # a calibration or state write cut short
                continue
            if child.name.startswith("."):
                for tag in (_STAGING_TAG, _OLD_TAG):
                    if tag in child.name:
                        recover_destination(self.path / child.name[1:].split(tag, 1)[0])
                continue
            if not child.is_dir():
                continue
            try:
                name = model_name(child.name)
                open_model_checkpoints(child)
            except (InvalidModelName, FormatError) as e:
                shutil.rmtree(child, ignore_errors=True)
                notes.append(f"{self.name}: removed {child.name}: {e}")
                continue
            meta = saved.get(name, {})
            self._entries[name] = Entry(name, directory_bytes(child),
                                        float(meta.get("last_used", child.stat().st_mtime)),
                                        bool(meta.get("pinned", False)))
        leftovers = [c.name for c in self.path.iterdir() if _STAGING_TAG in c.name]
        notes += [f"{self.name}: {n} belongs to a live writer; left alone" for n in leftovers]
        self._write_state()
        for note in notes:
            logger.warning("%s", note)
        return notes

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

    def evict(self, name: str, force: bool = False) -> int:
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
        # Renamed away first, so the visible name disappears at once and atomically; replicas
        # that already mapped or opened the files keep reading them.
        doomed = self.path / f".{dir_name(name)}{_OLD_TAG}{os.getpid()}-evicted"
        os.rename(self.path_of(name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("%s: evicted %s (%d bytes)", self.name, name, entry.bytes)
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
            self.evict(victim.name)

    def _read_state(self) -> dict[str, dict]:
        try:
            raw = json.loads((self.path / STATE_FILE).read_text())
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        state = {e.name: {"pinned": e.pinned, "last_used": e.last_used}
                 for e in self._entries.values()}
        tmp = self.path / f"{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path / STATE_FILE)
