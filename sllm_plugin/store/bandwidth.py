"""Read bandwidth per tier: measured once at start-up, then refined from every real load.

The router's placement estimate (startup = queue wait + size / bandwidth) is only as good as
these numbers, so they are measured on the tier's own storage rather than taken from a table,
and then follow what replicas actually observe (an exponential moving average).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .private import create_private_file

_BLOCK = 16 * 1024 * 1024


@dataclass
class BandwidthReport:
    calibrated_gbps: float | None
    observed_gbps: float | None
    samples: int

    @property
    def gbps(self) -> float | None:
        """The figure to plan with: what real loads saw, else the start-up measurement."""
        return self.observed_gbps if self.observed_gbps is not None else self.calibrated_gbps


class Bandwidth:
    """A thread-safe moving average of observed bandwidth, seeded by a calibration."""

    def __init__(self, calibrated_gbps: float | None = None, alpha: float = 0.3) -> None:
        self._lock = threading.Lock()
        self._calibrated = calibrated_gbps
        self._observed: float | None = None
        self._samples = 0
        self._alpha = alpha

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        gbps = nbytes / seconds / 1e9
        with self._lock:
            self._samples += 1
            self._observed = (gbps if self._observed is None
                              else self._alpha * gbps + (1 - self._alpha) * self._observed)

    def report(self) -> BandwidthReport:
        with self._lock:
            return BandwidthReport(self._calibrated, self._observed, self._samples)

    def seconds_for(self, nbytes: int) -> float | None:
        gbps = self.report().gbps
        return nbytes / (gbps * 1e9) if gbps else None


def calibrate_read(directory: Path, nbytes: int, direct: bool = True) -> float:
    """GB/s of reading `nbytes` from a fresh file in `directory`, as a cold load would.

    The file is written, flushed, dropped from the page cache, then read back, with O_DIRECT
    where `direct` and the file system allows it (a disk tier; shared memory is read through
    the page cache, where its pages are). It is removed afterwards, also on failure.
    """
    nbytes = max(_BLOCK, nbytes // _BLOCK * _BLOCK)
    path = directory / f".sllm-calibrate-{os.getpid()}-{secrets.token_hex(4)}"
    buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096) * (_BLOCK // 4096))
    try:
        with os.fdopen(create_private_file(path), "wb", buffering=0) as f:
            for _ in range(nbytes // _BLOCK):
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        try:
            started = time.perf_counter()
            offset = 0
            while offset < nbytes:
                n = os.preadv(fd, [buf], offset)
                if n <= 0:
                    break
                offset += n
            seconds = time.perf_counter() - started
        finally:
            os.close(fd)
        return offset / max(seconds, 1e-9) / 1e9
    finally:
        buf.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
