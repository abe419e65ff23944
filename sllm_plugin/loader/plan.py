"""Turn a checkpoint into read units: aligned pieces of data files and where each one lands.

Data files are laid out back to back in one destination buffer (each file's size is a multiple
of 4 KiB, so every file, unit and tensor starts 4 KiB-aligned there). A tensor is ready once
every unit overlapping it has landed; the plan knows which those are, so consumers can start on
early tensors while later units are still being read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..format.reader import Checkpoint
from ..format.spec import ALIGNMENT, DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class ReadUnit:
    file: str
    offset: int  # in the file
    length: int
    dest: int  # in the destination buffer
    checksum: str | None = None  # expected XXH3-64 hex, when verifying
    chunk: int = -1  # checksum chunk number within the file, when verifying


@dataclass(frozen=True)
class LoadPlan:
    total_bytes: int
    file_base: dict[str, int]
    units: list[ReadUnit]
    #: for each unit, the positions (in index.tensors) of the tensors it completes a part of
    unit_tensors: list[list[int]]
    #: for each tensor, how many units must land before it is complete
    tensor_unit_count: list[int]

    @property
    def max_unit_bytes(self) -> int:
        return max((u.length for u in self.units), default=0)


def make_plan(
    ckpt: Checkpoint, *, chunk_bytes: int | None = None, verify: bool = False
) -> LoadPlan:
    """Plan a full load. With `verify`, units are exactly the checksummed chunks."""
    index = ckpt.index
    unit_bytes = index.checksum.chunk_bytes if verify else (chunk_bytes or DEFAULT_CHUNK_BYTES)
    if unit_bytes <= 0 or unit_bytes % ALIGNMENT:
        raise ValueError(f"chunk size must be a positive multiple of {ALIGNMENT}, got {unit_bytes}")
    file_base: dict[str, int] = {}
    units: list[ReadUnit] = []
    base = 0
    for f in index.files:
        file_base[f.name] = base
        for n, start in enumerate(range(0, f.bytes, unit_bytes)):
            length = min(unit_bytes, f.bytes - start)
            units.append(
                ReadUnit(
                    file=f.name,
                    offset=start,
                    length=length,
                    dest=base + start,
                    checksum=f.checksums[n] if verify else None,
                    chunk=n if verify else -1,
                )
            )
        base += f.bytes

    # Units are sorted by destination; map each tensor to the unit range it overlaps.
    unit_tensors: list[list[int]] = [[] for _ in units]
    counts: list[int] = []
    starts = [u.dest for u in units]
    for pos, t in enumerate(index.tensors):
        if t.bytes == 0:
            counts.append(0)
            continue
        lo = file_base[t.file] + t.offset
        hi = lo + t.bytes
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        for u in range(first, last + 1):
            unit_tensors[u].append(pos)
        counts.append(last - first + 1)
    return LoadPlan(base, file_base, units, unit_tensors, counts)
