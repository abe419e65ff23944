"""Full checksum pass over a checkpoint, in bounded memory (one scratch buffer per thread)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..format.errors import FormatError
from ..format.reader import open_checkpoint
from .host_memory import allocate_host
from .io_engine import FileSet, read_checked, run_parallel
from .plan import ReadUnit, make_plan


@dataclass
class VerifyReport:
    path: str
    bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    #: one message per bad chunk, naming the file, the chunk and the tensors it holds
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_checkpoint(
    path: str | Path, *, threads: int | None = None, direct_io: bool | None = None,
    raise_on_error: bool = True,
) -> VerifyReport:
    """Validate the index and files, then check every chunk's checksum.

    Every bad chunk is reported, not just the first. Raises FormatError listing them unless
    `raise_on_error` is False (the CLI prints the report instead).
    """
    from .api import default_threads

    ckpt = open_checkpoint(path)
    plan = make_plan(ckpt, verify=True)
    threads = max(1, min(threads or default_threads(), len(plan.units)))
    scratch = [allocate_host(plan.max_unit_bytes) for _ in range(threads)]
    report = VerifyReport(path=str(path), bytes=plan.total_bytes, chunks=len(plan.units))
    lock = threading.Lock()
    started = time.perf_counter()
    with FileSet(ckpt.file_paths, direct_io) as files:

        def work(worker: int, _i: int, unit: ReadUnit) -> None:
            try:
                read_checked(files, ckpt, unit, scratch[worker].data_ptr())
            except FormatError as e:
                with lock:
                    report.errors.append(str(e))

        for _ in run_parallel(plan.units, threads, work):
            pass
    report.seconds = time.perf_counter() - started
    report.errors.sort()
    if report.errors and raise_on_error:
        raise FormatError(
            f"{path}: {len(report.errors)} corrupt chunk(s):\n" + "\n".join(report.errors)
        )
    return report
