"""Full checksum pass over a checkpoint, in bounded memory (one scratch buffer per thread)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..format.errors import FormatError
from ..format.reader import open_checkpoint
from .checks import StreamedChecks, empty_tensor_errors
from .host_memory import allocate_host
from .io_engine import FileSet, ShortRead, read_checked, run_parallel
from .plan import ReadUnit, make_plan


@dataclass
class VerifyReport:
    path: str
    bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    #: one message per problem: each bad chunk (naming the file, the chunk and the tensors it
    #: holds) and each tensor that fails its own checksum although its chunks pass
    errors: list[str] = field(default_factory=list)
    #: how many of `errors` are bad chunks; the rest are tensor checksum mismatches
    bad_chunks: int = 0
    #: the tensors whose own checksum failed while every chunk holding them passed
    bad_tensors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_checkpoint(
    path: str | Path, *, threads: int | None = None, direct_io: bool | None = None,
    raise_on_error: bool = True,
) -> VerifyReport:
    """Validate the index and files, then check every chunk's checksum and every tensor's.

    Chunk checksums prove the files hold what was written; tensor checksums prove the index
    points at the right bytes (two same-size tensors with swapped offsets pass every chunk
    check). Both are computed in the one pass over the files. Every problem is reported, not
    just the first; a tensor already named by its bad chunk is not reported twice. Raises
    FormatError listing them unless `raise_on_error` is False (the CLI prints the report).
    """
    from .api import default_threads

    ckpt = open_checkpoint(path)
    plan = make_plan(ckpt, verify=True)
    threads = max(1, min(threads or default_threads(), len(plan.units)))
    scratch = [allocate_host(plan.max_unit_bytes) for _ in range(threads)]
    report = VerifyReport(path=str(path), bytes=plan.total_bytes, chunks=len(plan.units))
    checks = StreamedChecks(ckpt, plan)
    chunk_errors: list[str] = []
    tensor_errors: dict[int, str] = {}  # position in index.tensors -> message
    named: set[int] = set()  # tensors in a bad chunk: that chunk's message covers them
    lock = threading.Lock()
    started = time.perf_counter()
    with FileSet(ckpt.file_paths, direct_io) as files:

        def work(worker: int, i: int, unit: ReadUnit) -> None:
            addr: int | None = scratch[worker].data_ptr()
            try:
                try:
                    read_checked(files, ckpt, unit, addr)
                except FormatError as e:
                    if isinstance(e, ShortRead):
                        addr = None  # no bytes to hash
                    with lock:
                        chunk_errors.append(str(e))
                        named.update(plan.unit_tensors[i])
                bad = checks.unit(i, unit, addr)
            except BaseException as e:
                checks.abort(e)
                raise
            with lock:
                tensor_errors.update(bad)

        for _ in run_parallel(plan.units, threads, work):
            pass
    report.seconds = time.perf_counter() - started
    tensors = ckpt.index.tensors
    tensor_errors.update(empty_tensor_errors(ckpt))
    kept = sorted(pos for pos in tensor_errors if pos not in named)
    report.bad_chunks = len(chunk_errors)
    report.bad_tensors = [tensors[pos].name for pos in kept]
    report.errors = sorted(chunk_errors) + [tensor_errors[pos] for pos in kept]
    if report.errors and raise_on_error:
        parts = []
        if chunk_errors:
            parts.append(f"{len(chunk_errors)} corrupt chunk(s)")
        if kept:
            parts.append(f"{len(kept)} tensor(s) failing their own checksum")
        raise FormatError(f"{path}: {', '.join(parts)}:\n" + "\n".join(report.errors))
    return report
