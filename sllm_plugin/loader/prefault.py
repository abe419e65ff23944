"""Fault destination pages in ahead of the readers, on a thread of its own.

A load into fresh memory pays one page fault per 4 KiB page. A reader that faults its own
destination has no I/O in flight meanwhile, which on a cold load (disk-bound) serializes disk
time and fault time. This thread walks the units in order, populating each destination before
its reader gets there, so the disk queue stays full while the CPU faults. A reader that
overtakes it simply populates its own unit (claim() says which); nobody waits on a slow
prefaulter except for a unit it is populating at that very moment.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .. import _fastio
from .plan import ReadUnit

_UNTOUCHED, _POPULATING, _DONE = 0, 1, 2


class Prefaulter:
    def __init__(self, base: int, units: Sequence[ReadUnit]) -> None:
        self._base = base
        self._units = units
        self._state = bytearray(len(units))
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sllm-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, unit in enumerate(self._units):
            with self._cv:
                if self._stop:
                    return
                if self._state[i] != _UNTOUCHED:
                    continue
                self._state[i] = _POPULATING
            try:
                _fastio.populate(self._base + unit.dest, unit.length)
            finally:
                with self._cv:
                    self._state[i] = _DONE
                    self._cv.notify_all()

    def claim(self, i: int) -> bool:
        """Called by the reader of unit i: True if the reader must fault its pages itself."""
        with self._cv:
            if self._state[i] == _UNTOUCHED:
                self._state[i] = _DONE
                return True
            while self._state[i] == _POPULATING:
                self._cv.wait()
            return False

    def close(self) -> None:
        with self._cv:
            self._stop = True
        self._thread.join()
