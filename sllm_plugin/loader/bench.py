"""`sllm bench`: load throughput, warm and cold, beside the machine's raw limits in one run.

The raw limits use the same files, threads and read units as the loader, minus everything that
makes a load a load (fresh caller-owned memory, views, validation):
- memory copy: memcpy between two pre-faulted 256 MiB buffers;
- warm read: pread from the page cache into a pre-faulted buffer (the ceiling for a warm load);
- warm read, fresh memory: the same into newly allocated memory (what a naive loader pays for
  first-touch page faults);
- direct read: O_DIRECT pread with the page cache dropped (the ceiling for a cold load).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import _fastio
from ..format.reader import open_checkpoint
from .api import LoadStats, default_threads, load_state_dict
from .io_engine import FileSet, run_parallel
from .plan import ReadUnit, make_plan

MEMCPY_BYTES = 256 * 1024 * 1024


def evict_page_cache(paths: list[Path]) -> str:
    """Make the next read of `paths` come from the disk. Returns the method used.

    As root the whole page cache is dropped (what "cold" means on a fresh server); otherwise
    each file's pages are dropped with posix_fadvise, which needs no privilege.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            _fastio.evict_from_page_cache(fd)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    return "fadvise"


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(64 * 1024 * 1024)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def memcpy_gbps(repeats: int = 5) -> float:
    src = torch.empty(MEMCPY_BYTES, dtype=torch.uint8)
    dst = torch.empty(MEMCPY_BYTES, dtype=torch.uint8)
    _fastio.fill_memory(src.data_ptr(), MEMCPY_BYTES, 1)
    _fastio.fill_memory(dst.data_ptr(), MEMCPY_BYTES, 0)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        _fastio.copy_memory(dst.data_ptr(), src.data_ptr(), MEMCPY_BYTES)
        rates.append(MEMCPY_BYTES / 1e9 / (time.perf_counter() - t))
    return statistics.median(rates)


def first_touch_gbps(nbytes: int, threads: int) -> float:
    """Fault in fresh memory with `threads` threads writing zeros: the page-fault bound.

    Any load into memory the caller owns must fault its pages in once; on a VM whose host backs
    guest memory lazily this, not the copy, is the binding limit for warm loads.
    """
    import threading

    t = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    per = -(-nbytes // threads) // 4096 * 4096 or 4096
    parts = [(buf.data_ptr() + o, min(per, nbytes - o)) for o in range(0, nbytes, per)]
    workers = [threading.Thread(target=_fastio.fill_memory, args=p) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return nbytes / 1e9 / (time.perf_counter() - t)


def raw_read_gbps(
    path: Path, *, threads: int, direct: bool, buffer: torch.Tensor | None = None
) -> float:
    """pread every data file with `threads` threads into `buffer` (fresh memory if None)."""
    ckpt = open_checkpoint(path)
    plan = make_plan(ckpt)
    t = time.perf_counter()
    dest = buffer if buffer is not None else torch.empty(plan.total_bytes, dtype=torch.uint8)
    base = dest.data_ptr()
    with FileSet(ckpt.file_paths, direct) as files:

        def work(_w: int, _i: int, unit: ReadUnit) -> None:
            files.read(unit, base + unit.dest, False)

        for _ in run_parallel(plan.units, threads, work):
            pass
    return plan.total_bytes / 1e9 / (time.perf_counter() - t)


@dataclass
class BenchResult:
    path: str
    bytes: int
    threads: int
    repeats: int
    cold_method: str = ""
    memcpy_gbps: float = 0.0
    warm_read_gbps: float = 0.0
    warm_read_fresh_gbps: float = 0.0
    direct_read_gbps: float = 0.0
    load_warm_gbps: list[float] = field(default_factory=list)
    load_cold_gbps: list[float] = field(default_factory=list)

    @property
    def warm(self) -> float:
        return statistics.median(self.load_warm_gbps) if self.load_warm_gbps else 0.0

    @property
    def cold(self) -> float:
        return statistics.median(self.load_cold_gbps) if self.load_cold_gbps else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "load_warm_median_gbps": self.warm,
                "load_cold_median_gbps": self.cold}

    def table(self) -> str:
        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}" if b else "-"

        rows = [
            ("raw: memory copy (pre-faulted)", self.memcpy_gbps, ""),
            ("raw: warm read, pre-faulted buffer", self.warm_read_gbps, ""),
            ("raw: warm read, fresh memory", self.warm_read_fresh_gbps, ""),
            ("raw: O_DIRECT read, cache dropped", self.direct_read_gbps, ""),
            ("sllm load, warm (median)", self.warm,
             f"{ratio(self.warm, self.warm_read_gbps)} of warm read, "
             f"{ratio(self.warm, self.warm_read_fresh_gbps)} of fresh-memory read"),
            ("sllm load, cold (median)", self.cold,
             f"{ratio(self.cold, self.direct_read_gbps)} of O_DIRECT read"),
        ]
        lines = [
            f"{self.path}: {self.bytes / 1e9:.3f} GB, {self.threads} threads, "
            f"{self.repeats} repeats, cold = {self.cold_method}",
            f"{'measurement':<38} {'GB/s':>7}  ratio",
        ]
        lines += [f"{name:<38} {gbps:>7.2f}  {note}" for name, gbps, note in rows]
        return "\n".join(lines)


def run_bench(
    path: str | Path,
    *,
    threads: int | None = None,
    repeats: int = 3,
    cold: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (the median of none is nothing), "
                         f"got {repeats}")
    path = Path(path)
    ckpt = open_checkpoint(path)
    files = list(ckpt.file_paths.values())
    threads = threads or default_threads()
    res = BenchResult(str(path), ckpt.total_bytes, threads, repeats)
    say = log or (lambda _msg: None)

    say("measuring memory copy")
    res.memcpy_gbps = memcpy_gbps()
    warm_page_cache(files)
    say("measuring warm reads")
    prefaulted = torch.empty(ckpt.total_bytes, dtype=torch.uint8)
    _fastio.fill_memory(prefaulted.data_ptr(), ckpt.total_bytes)
    res.warm_read_gbps = statistics.median(
        raw_read_gbps(path, threads=threads, direct=False, buffer=prefaulted)
        for _ in range(repeats)
    )
    res.warm_read_fresh_gbps = statistics.median(
        raw_read_gbps(path, threads=threads, direct=False) for _ in range(repeats)
    )
    say("measuring warm loads")
    for _ in range(repeats):
        stats = LoadStats()
        loaded = load_state_dict(path, threads=threads, stats=stats)
        del loaded
        res.load_warm_gbps.append(stats.gbps)
    if cold:
        say("measuring cold reads and loads")
        direct = []
        for _ in range(repeats):
            res.cold_method = evict_page_cache(files)
            direct.append(raw_read_gbps(path, threads=threads, direct=True, buffer=prefaulted))
        res.direct_read_gbps = statistics.median(direct)
        for _ in range(repeats):
            evict_page_cache(files)
            stats = LoadStats()
            loaded = load_state_dict(path, threads=threads, stats=stats)
            del loaded
            res.load_cold_gbps.append(stats.gbps)
    return res
