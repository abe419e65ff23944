"""Private, copy-on-write mappings of a checkpoint's data files.

Used where the consumer can take tensors that live in the page cache (or in the node's DRAM
tier, which is shared memory) instead of memory of its own: nothing is allocated and nothing
is copied by the loader. Pages not yet cached are read in by worker threads calling
MADV_POPULATE_READ on disjoint ranges, which reads the file in parallel through the page cache;
a write to a mapped tensor copies just that page, privately, so the file never changes.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import torch

from .. import _fastio
from ..format.reader import Checkpoint
from .io_engine import FileSet
from .plan import ReadUnit


def map_files(ckpt: Checkpoint, files: FileSet) -> dict[str, torch.Tensor]:
    """Each data file as a uint8 tensor over a private, writable (copy-on-write) mapping.

    The tensor keeps the mapping alive; closing `files` afterwards is fine.
    """
    maps: dict[str, torch.Tensor] = {}
    for f in ckpt.index.files:
        if f.bytes:
            mapped = mmap.mmap(files.buffered_fd(f.name), f.bytes, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            maps[f.name] = torch.frombuffer(mapped, dtype=torch.uint8)
        else:
            maps[f.name] = torch.empty(0, dtype=torch.uint8)
    return maps


def populate_worker(ckpt: Checkpoint,
                    maps: dict[str, torch.Tensor]) -> Callable[[int, int, ReadUnit], None]:
    """A run_parallel work function that brings each unit's file range into its mapping."""

    def populate(_worker: int, _i: int, unit: ReadUnit) -> None:
        _fastio.populate_read(maps[unit.file].data_ptr() + unit.offset, unit.length,
                              str(ckpt.file_paths[unit.file]), unit.offset)

    return populate
