"""Open a checkpoint directory and validate it against its data files before anything is read.

Validation here is cheap (one stat per file) and always done; checksums are the loader's job
because checking them means reading every byte.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError
from .index import DataFile, Index, TensorEntry, read_index_file
from .safefs import real_directory, stat_regular
from .spec import ENGINE_RANK_DIR, INDEX_FILENAME


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its directory, its index, and the resolved data file paths."""

    directory: Path
    index: Index
    file_paths: dict[str, Path]

    @property
    def total_bytes(self) -> int:
        return self.index.total_bytes

    def tensors_in(self, file: str, start: int, end: int) -> list[TensorEntry]:
        """Tensors whose bytes overlap [start, end) of `file`: used to name what a bad chunk hit."""
        return [
            t
            for t in self.index.tensors
            if t.file == file and t.offset < end and t.offset + t.bytes > start
        ]

    def data_file(self, name: str) -> DataFile:
        for f in self.index.files:
            if f.name == name:
                return f
        raise KeyError(name)


def is_checkpoint(path: str | Path) -> bool:
    """A directory holding a (single-directory) checkpoint: the index file is there. A probe
    only (never raises); open_checkpoint is what validates."""
    try:
        return stat.S_ISREG(os.stat(Path(path) / INDEX_FILENAME).st_mode)
    except (OSError, ValueError):
        return False


def is_engine_checkpoint(path: str | Path) -> bool:
    """An `engine` layout checkpoint: one rank-NNNNN/ sub-checkpoint per tensor-parallel rank."""
    return is_checkpoint(Path(path) / ENGINE_RANK_DIR.format(rank=0))


def open_model_checkpoints(path: str | Path) -> list[Checkpoint]:
    """Validate a checkpoint directory of either layout: itself, or every rank of an engine
    checkpoint (rank directories numbered from 0 without gaps, each a real directory, not a
    symlink, whose index is the engine layout for that rank of that many). Raises FormatError
    and nothing else, whatever the directory holds."""
    directory = Path(path)
    if not is_engine_checkpoint(directory):
        return [open_checkpoint(directory)]
    try:
        entries = {e.name: e for e in os.scandir(directory) if e.name.startswith("rank-")}
    except OSError as e:
        raise FormatError(f"{directory}: cannot list the engine checkpoint: "
                          f"{e.strerror or e}") from None
    ranks = sorted(entries)
    expected = [ENGINE_RANK_DIR.format(rank=i) for i in range(len(ranks))]
    if ranks != expected:
        shown = ranks if len(ranks) <= 10 else [*ranks[:10], "..."]
        raise FormatError(f"{directory}: engine checkpoint rank directories are {shown}, "
                          f"expected rank-00000 to {expected[-1]} without gaps")
    checkpoints = []
    for rank, name in enumerate(ranks):
        entry, where = entries[name], directory / name
        try:
            is_link, is_dir = entry.is_symlink(), entry.is_dir(follow_symlinks=False)
        except OSError as e:
            raise FormatError(f"{where}: cannot stat the rank directory: "
                              f"{e.strerror or e}") from None
        if is_link:
            raise FormatError(f"{where}: rank directory is a symbolic link; the ranks of an "
                              "engine checkpoint must be directories inside it")
        if not is_dir:
            raise FormatError(f"{where}: rank directory is not a directory")
        ckpt = open_checkpoint(where)
        engine = ckpt.index.engine
        if engine is None or engine.rank != rank or engine.tensor_parallel_size != len(ranks):
            got = ("not the engine layout" if engine is None else
                   f"rank {engine.rank} of tensor_parallel_size {engine.tensor_parallel_size}")
            raise FormatError(f"{where / INDEX_FILENAME}: the index of rank {rank} of "
                              f"{len(ranks)} says {got}")
        checkpoints.append(ckpt)
    return checkpoints


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate the index and check every data file on disk (stat only: nothing is
    opened but the index). Raises FormatError and nothing else, whatever the directory holds:
    a data file is a regular file inside the checkpoint, symlinks followed (a symlink to
    another file inside is fine; one out, a loop, a FIFO or a device is an error)."""
    directory = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        raise FormatError(f"{directory}: not a directory (an sllm checkpoint is a directory)")
    index = read_index_file(directory)
    root = real_directory(directory, "checkpoint directory")
    paths: dict[str, Path] = {}
    for f in index.files:
        p = directory / f.name  # the name pattern (checked in the index) allows no separator
        if not os.path.lexists(p):
            raise FormatError(f"{p}: data file listed in the index is missing")
        _, st = stat_regular(p, "data file", root=root)
        if st.st_size != f.bytes:
            hit = _first_tensor_beyond(index, f.name, st.st_size)
            what = f"; tensor {hit!r} is cut off" if hit else ""
            kind = "truncated" if st.st_size < f.bytes else "larger than recorded"
            raise FormatError(
                f"{p}: data file is {kind}: {st.st_size} bytes on disk, {f.bytes} in the index"
                f"{what}"
            )
        paths[f.name] = p
    return Checkpoint(directory=directory, index=index, file_paths=paths)


def _first_tensor_beyond(index: Index, file: str, size: int) -> str | None:
    for t in index.tensors:
        if t.file == file and t.offset + t.bytes > size:
            return t.name
    return None
