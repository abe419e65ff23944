"""The load API: `load_state_dict` and its streaming form `iter_state_dict`.

The loader reads the paths it is given; which tier a path lives on is the store's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..format.errors import FormatError
from ..format.index import TensorEntry
from ..format.reader import Checkpoint, open_checkpoint
from ..format.spec import LAYOUT_ENGINE
from .checks import InPlaceChecks
from .dtypes import torch_dtype
from .host_memory import allocate_host
from .io_engine import FileSet, read_checked, run_parallel
from .mapping import map_files, populate_worker
from .plan import LoadPlan, ReadUnit, make_plan
from .prefault import Prefaulter

logger = logging.getLogger("sllm_plugin")


def default_threads() -> int:
    """I/O threads: enough to keep a disk queue busy and every core copying from the cache.

    On this project's 2-core reference machine 4 threads reach both the cold direct-read and
    the warm page-cache limits (benchmarks/RESULTS.md); more cores want more threads.
    """
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


@dataclass
class LoadStats:
    """What one load did; filled in as the load runs, complete when it returns."""

    path: str = ""
    bytes: int = 0
    seconds: float = 0.0
    threads: int = 0
    direct_files: int = 0
    files: int = 0
    device: str = "cpu"
    verified: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        io = "direct" if self.direct_files == self.files else (
            "buffered" if not self.direct_files else f"direct {self.direct_files}/{self.files}"
        )
        if self.extra.get("mode") == "mapped":
            io = "page-cache mapped (zero-copy)"
        return (
            f"loaded {self.path}: {self.bytes / 1e9:.3f} GB in {self.seconds:.3f} s "
            f"({self.gbps:.2f} GB/s) to {self.device}, {self.threads} threads, {io} I/O"
            + (", checksums verified" if self.verified else "")
        )


def iter_state_dict(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    chunk_bytes: int | None = None,
    stats: LoadStats | None = None,
    zero_copy: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) as soon as each tensor's bytes have all landed.

    `zero_copy` is for consumers that copy every tensor somewhere else right away (an engine's
    `load_weights`): when every data file is already in the page cache (and `verify` is off),
    tensors are views of a private (copy-on-write) mapping of the files, so no fresh memory is
    faulted in and no byte is copied before the consumer's own copy. Otherwise, and always for
    `load_state_dict`, bytes land in memory the caller owns.

    Order follows completion, which is close to index order; tied names (aliases) come right
    after their tensor and are the same tensor object. The checkpoint is validated (index,
    extents, file sizes) before the first read; `verify` also checks every chunk's checksum
    and every tensor's own checksum (so an index pointing at the wrong bytes is caught), on
    the bytes as they land, before the tensor is yielded.
    """
    yield from _iter_checkpoint(open_checkpoint(path), device, threads=threads,
                                direct_io=direct_io, verify=verify, chunk_bytes=chunk_bytes,
                                stats=stats, zero_copy=zero_copy)


def _iter_checkpoint(
    ckpt: Checkpoint,
    device: str | torch.device,
    *,
    threads: int | None,
    direct_io: bool | None,
    verify: bool,
    chunk_bytes: int | None,
    stats: LoadStats | None,
    zero_copy: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    path = ckpt.directory
    if ckpt.index.layout == LAYOUT_ENGINE:
        logger.debug("loading an engine-layout rank directory as a plain state dict: %s", path)
    device = torch.device(device)
    threads = threads or default_threads()
    plan = make_plan(ckpt, chunk_bytes=chunk_bytes, verify=verify)
    stats = stats if stats is not None else LoadStats()
    stats.path, stats.bytes, stats.threads = str(path), plan.total_bytes, threads
    stats.device, stats.verified, stats.files = str(device), verify, len(ckpt.index.files)

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        files = stack.enter_context(FileSet(ckpt.file_paths, direct_io))
        stats.direct_files = files.direct_files
        if device.type == "cpu" and zero_copy and not verify and direct_io is not True:
            # Private mappings of the data files: nothing allocated, nothing copied here. What
            # is not cached yet is read in by the workers (parallel MADV_POPULATE_READ), and
            # each tensor is handed over as soon as its chunks are in.
            stats.extra["mode"] = "mapped"
            maps = map_files(ckpt, files)

            def raw(t: TensorEntry) -> torch.Tensor:
                return maps[t.file][t.offset : t.offset + t.bytes]

            if files.all_resident:
                completed: Iterator[int] = iter(range(len(plan.units)))
            else:
                completed = run_parallel(plan.units, threads, populate_worker(ckpt, maps))
                stack.callback(completed.close)
            yield from _tensors_as_completed(ckpt, plan, raw, completed)
            stats.seconds = time.perf_counter() - started
            logger.info("%s", stats.summary())
            return
        if device.type == "cpu":
            buffer = allocate_host(plan.total_bytes)
            base = buffer.data_ptr()
            prefaulter = Prefaulter(base, plan.units)
            stack.callback(prefaulter.close)
            checks = InPlaceChecks(ckpt, plan, base) if verify else None

            def work(_worker: int, i: int, unit: ReadUnit) -> None:
                read_checked(files, ckpt, unit, base + unit.dest, fresh=prefaulter.claim(i))
                if checks is not None:  # before the unit counts as landed: nothing unchecked
                    checks.landed(i)  # is handed out

            completed = run_parallel(plan.units, threads, work)

            def raw(t: TensorEntry) -> torch.Tensor:
                start = plan.file_base[t.file] + t.offset
                return buffer[start : start + t.bytes]
        elif device.type == "cuda":
            from .cuda import load_units_to_cuda

            buffer, completed = load_units_to_cuda(ckpt, plan, files, device, threads,
                                                   verify=verify)

            def raw(t: TensorEntry) -> torch.Tensor:
                start = plan.file_base[t.file] + t.offset
                return buffer[start : start + t.bytes]
        else:
            raise ValueError(f"unsupported device {device} (expected cpu or cuda)")
        # Runs first on exit (LIFO): workers are joined before their files close, also when
        # the consumer stops iterating early.
        stack.callback(completed.close)
        yield from _tensors_as_completed(ckpt, plan, raw, completed)
    stats.seconds = time.perf_counter() - started
    logger.info("%s", stats.summary())


def load_state_dict(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    chunk_bytes: int | None = None,
    stats: LoadStats | None = None,
) -> dict[str, torch.Tensor]:
    """Load a whole checkpoint; tensors are views into one allocation on `device`.

    Bytes are copied exactly once, from the file (or page cache) into that allocation. Tied
    weights come back as one shared tensor under each name.
    """
    ckpt = open_checkpoint(path)
    loaded = dict(
        _iter_checkpoint(ckpt, device, threads=threads, direct_io=direct_io, verify=verify,
                         chunk_bytes=chunk_bytes, stats=stats)
    )
    order = [t.name for t in ckpt.index.tensors] + list(ckpt.index.aliases)
    return {name: loaded[name] for name in order}


def _tensors_as_completed(
    ckpt: Checkpoint, plan: LoadPlan, raw: Callable[[TensorEntry], torch.Tensor],
    completed: Iterator[int],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor (and its aliases) once every unit holding its bytes has completed;
    `raw(entry)` is the tensor's bytes wherever they landed."""
    index = ckpt.index
    aliases_of: dict[str, list[str]] = {}
    for alias, target in index.aliases.items():
        aliases_of.setdefault(target, []).append(alias)
    remaining = list(plan.tensor_unit_count)

    def view(pos: int) -> Iterator[tuple[str, torch.Tensor]]:
        t = index.tensors[pos]
        tensor = raw(t).view(torch_dtype(t.dtype, tensor=t.name)).view(t.shape)
        yield t.name, tensor
        for alias in aliases_of.get(t.name, ()):
            yield alias, tensor

    for pos, count in enumerate(remaining):
        if count == 0:
            yield from view(pos)
    for unit in completed:
        for pos in plan.unit_tensors[unit]:
            remaining[pos] -= 1
            if remaining[pos] == 0:
                yield from view(pos)


__all__ = ["FormatError", "LoadStats", "iter_state_dict", "load_state_dict"]
