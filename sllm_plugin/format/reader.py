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
    """A directory holding a (single-directory) checkpoint: the index file is there."""
    return (Path(path) / INDEX_FILENAME).is_file()


def is_engine_checkpoint(path: str | Path) -> bool:
    """An `engine` layout checkpoint: one rank-NNNNN/ sub-checkpoint per tensor-parallel rank."""
    return is_checkpoint(Path(path) / ENGINE_RANK_DIR.format(rank=0))


def open_model_checkpoints(path: str | Path) -> list[Checkpoint]:
    """Validate a checkpoint directory of either layout: itself, or every rank of an engine
    checkpoint (rank directories numbered from 0 without gaps). Raises FormatError."""
    directory = Path(path)
    if not is_engine_checkpoint(directory):
        return [open_checkpoint(directory)]
    ranks = sorted(p.name for p in directory.iterdir() if p.name.startswith("rank-"))
    expected = [ENGINE_RANK_DIR.format(rank=i) for i in range(len(ranks))]
    if ranks != expected:
        raise FormatError(f"{directory}: engine checkpoint rank directories are {ranks}, "
                          f"expected {expected}")
    return [open_checkpoint(directory / name) for name in ranks]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate the index and check every data file on disk. Raises FormatError."""
    directory = Path(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory (an sllm checkpoint is a directory)")
    index = read_index_file(directory)
    real_dir = directory.resolve()
    paths: dict[str, Path] = {}
    for f in index.files:
        p = directory / f.name
        # The name pattern already forbids separators; this also catches a symlink pointing out.
        real = p.resolve()
        if real.parent != real_dir and real_dir not in real.parents:
            raise FormatError(f"{p}: data file resolves outside the checkpoint ({real})")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise FormatError(f"{p}: data file listed in the index is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{p}: data file is not a regular file")
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
