"""The CUDA target: read through a bounded ring of pinned host buffers into one device buffer.

Each I/O worker owns one pinned buffer and one CUDA stream: it reads a unit into its buffer,
enqueues the host-to-device copy on its stream and waits for that copy before reusing the
buffer. With N workers, N reads and copies overlap on N streams, pinned memory stays at
N x unit size whatever the model size, and a unit is reported complete only once its bytes
are on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..format.errors import FormatError
from ..format.reader import Checkpoint
from .checks import StreamedChecks, empty_tensor_errors
from .io_engine import FileSet, read_checked, run_parallel
from .plan import LoadPlan, ReadUnit


def load_units_to_cuda(
    ckpt: Checkpoint, plan: LoadPlan, files: FileSet, device: torch.device, threads: int,
    *, verify: bool = False,
) -> tuple[torch.Tensor, Iterator[int]]:
    """Allocate the device buffer and return it with an iterator of completed unit indices.

    With `verify` (the plan's units are then the checksum chunks), read_checked checks each
    chunk and every tensor's own checksum is computed from the pinned buffer while its
    host-to-device copy runs; a unit is reported complete only after both.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    checks = StreamedChecks(ckpt, plan) if verify else None
    if checks is not None:
        errors = empty_tensor_errors(ckpt)
        if errors:
            raise FormatError(errors[0][1])
    device_buf = torch.empty(plan.total_bytes, dtype=torch.uint8, device=device)
    workers = max(1, min(threads, len(plan.units)))
    ring = [
        torch.empty(plan.max_unit_bytes, dtype=torch.uint8, pin_memory=True)
        for _ in range(workers)
    ]
    streams = [torch.cuda.Stream(device=device) for _ in range(workers)]

    def work(worker: int, i: int, unit: ReadUnit) -> None:
        host = ring[worker]
        try:
            read_checked(files, ckpt, unit, host.data_ptr())
            stream = streams[worker]
            try:
                with torch.cuda.stream(stream):
                    device_buf[unit.dest : unit.dest + unit.length].copy_(
                        host[: unit.length], non_blocking=True
                    )
                bad = checks.unit(i, unit, host.data_ptr()) if checks is not None else []
            finally:
                stream.synchronize()  # the buffer is free again (also when a check failed)
            if bad:
                raise FormatError(bad[0][1])
        except BaseException as e:
            if checks is not None:
                checks.abort(e)  # a waiter for this unit's pieces must not wait forever
            raise

    return device_buf, run_parallel(plan.units, workers, work)
