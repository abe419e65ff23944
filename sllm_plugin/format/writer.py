"""Write checkpoints atomically: stage in a hidden sibling directory, fsync, then rename.

A writer killed at any moment leaves at most a hidden staging directory without an index (which
never validates, and which the next writer for the same destination removes), never a
half-written checkpoint under the destination name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import xxhash

from .. import __version__
from .errors import CheckpointExistsError, CheckpointWriteError, FormatError
from .index import DataFile, EngineInfo, Index, Source, TensorEntry, check_index
from .reader import is_checkpoint, is_engine_checkpoint
from .safefs import open_regular
from .spec import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PARTITION_BYTES,
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    LAYOUT_HF,
    MAX_INDEX_BYTES,
    align_up,
    data_file_name,
    tensor_nbytes,
)

if TYPE_CHECKING:
    import torch

Buffer = bytes | bytearray | memoryview

_ZEROS = bytes(ALIGNMENT)
_STAGING_TAG = ".sllm-tmp-"
_OLD_TAG = ".sllm-old-"
_COPY_BLOCK = 16 * 1024 * 1024
#: New files: never through a link, never an existing file (staging is ours alone).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_file(path: Path, mode: int = 0o666) -> BinaryIO:
    """A new file for writing with permission bits `mode` (less the umask), O_EXCL|O_NOFOLLOW."""
    fd = os.open(path, _CREATE, mode)
    return os.fdopen(fd, "wb")


def copy_regular_file(source: Path, target: Path, *, root: Path | None = None) -> int:
    """Copy a regular file's bytes and permission bits (less the umask) into a new `target`,
    fsynced; returns the bytes copied. Never through a link (a symlink is followed only to a
    regular file inside `root`), never from a FIFO or a device: FormatError names the file.
    """
    fd = open_regular(source, "side file", root=root, container="the source directory")
    try:
        mode = os.fstat(fd).st_mode & 0o777 | 0o600
        with os.fdopen(fd, "rb", closefd=False) as fin, create_file(target, mode) as fout:
            copied = 0
            while block := fin.read(_COPY_BLOCK):
                fout.write(block)
                copied += len(block)
            fout.flush()
            os.fsync(fout.fileno())
        return copied
    finally:
        os.close(fd)


class _DataFileWriter:
    """One data file: appends bytes, pads to alignment, and checksums each chunk as it goes."""

    def __init__(self, path: Path, chunk_bytes: int, mode: int = 0o666) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.file: BinaryIO = create_file(path, mode)
        self.pos = 0
        self.checksums: list[str] = []
        self._hasher = xxhash.xxh3_64()

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            room = self.chunk_bytes - self.pos % self.chunk_bytes
            piece = view[:room]
            self.file.write(piece)
            self._hasher.update(piece)
            self.pos += piece.nbytes
            view = view[piece.nbytes :]
            if self.pos % self.chunk_bytes == 0:
                self._finish_chunk()

    def pad(self) -> None:
        missing = align_up(self.pos) - self.pos
        if missing:
            self.write(_ZEROS[:missing])

    def _finish_chunk(self) -> None:
        self.checksums.append(self._hasher.hexdigest())
        self._hasher.reset()

    def close(self) -> DataFile:
        self.pad()
        if self.pos % self.chunk_bytes:
            self._finish_chunk()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return DataFile(name=self.path.name, bytes=self.pos, checksums=self.checksums)

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_checkpoint_dir(path: Path) -> bool:
    return is_checkpoint(path) or is_engine_checkpoint(path)


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuse to replace a checkpoint without `overwrite`, and anything else at all."""
    dest = destination
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise CheckpointExistsError(f"{dest} exists and is not a directory")
    if _is_checkpoint_dir(dest):
        if not overwrite:
            raise CheckpointExistsError(
                f"{dest} already holds an sllm checkpoint; pass overwrite=True "
                "(--overwrite) to replace it"
            )
    elif any(dest.iterdir()):
        raise CheckpointExistsError(
            f"{dest} exists and is not an sllm checkpoint; refusing to replace it"
        )


def new_staging_dir(destination: Path, mode: int = 0o777) -> Path:
    """A hidden sibling of `destination` to build it in, with permission bits `mode` (less the
    umask), which the checkpoint keeps; see recover_destination."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    recover_destination(destination)
    staging = destination.parent / (
        f".{destination.name}{_STAGING_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    )
    staging.mkdir(mode=mode)
    return staging


def commit_directory(staging: Path, destination: Path, overwrite: bool) -> None:
    """Move a fully written, fsynced staging directory into place with renames."""
    _fsync_dir(staging)
    check_destination(destination, overwrite)
    if destination.exists():
        old = destination.parent / (
            f".{destination.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        )
        os.rename(destination, old)
        os.rename(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, destination)
    _fsync_dir(destination.parent)


def recover_destination(destination: Path) -> None:
    """Tidy what dead writers left beside `destination`.

    Staging directories of dead writers are removed. A replaced checkpoint whose replacement never
    arrived (the writer died between its two renames) is put back.
    """
    parent = destination.parent
    if not parent.is_dir():
        return
    for tag in (_OLD_TAG, _STAGING_TAG):
        prefix = f".{destination.name}{tag}"
        for entry in parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            if tag == _OLD_TAG and not destination.exists() and _is_checkpoint_dir(entry):
                os.rename(entry, destination)
            else:
                shutil.rmtree(entry, ignore_errors=True)


class CheckpointWriter:
    """Streams tensors into a new checkpoint directory.

    Use as a context manager: an exception inside the block removes everything written, and
    `commit()` makes the checkpoint appear under its name in one rename.
    """

    def __init__(
        self,
        destination: str | Path,
        *,
        overwrite: bool = False,
        layout: str = LAYOUT_HF,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        partition_bytes: int = DEFAULT_PARTITION_BYTES,
        source: Source | None = None,
        engine: EngineInfo | None = None,
        metadata: Mapping[str, str] | None = None,
        expected_bytes: int | None = None,
        on_bytes: Callable[[int], None] | None = None,
        file_mode: int = 0o666,
        dir_mode: int = 0o777,
    ) -> None:
        """`file_mode` and `dir_mode` are the permission bits of the data files and index and
        of the checkpoint directory (less the umask): the converter passes its source's, so a
        private model stays private."""
        if chunk_bytes <= 0 or chunk_bytes % ALIGNMENT:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}")
        if partition_bytes < ALIGNMENT:
            raise ValueError(f"partition_bytes must be at least {ALIGNMENT}")
        if metadata is not None:
            bad = [k for k, v in metadata.items()
                   if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise TypeError(f"metadata keys and values must be strings; offending keys: {bad}")
        self.destination = Path(destination)
        self.overwrite = overwrite
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self.partition_bytes = partition_bytes
        self.source = source or Source()
        self.engine = engine
        self.metadata = dict(metadata or {})
        self._on_bytes = on_bytes
        self.file_mode = file_mode & 0o666 | 0o600
        self._tensors: list[TensorEntry] = []
        self._names: set[str] = set()
        self._aliases: dict[str, str] = {}
        self._files: list[DataFile] = []
        self._current: _DataFileWriter | None = None
        self._committed = False

        check_destination(self.destination, overwrite)
        parent = self.destination.parent
        parent.mkdir(parents=True, exist_ok=True)
        recover_destination(self.destination)
        if expected_bytes is not None:
            usage = shutil.disk_usage(parent)
            # A total of 0 means the file system does not report sizes (ramfs, some FUSE):
            # nothing to check up front; ENOSPC, if it comes, is still handled.
            if usage.total and usage.free < expected_bytes:
                free = usage.free
                raise CheckpointWriteError(
                    errno.ENOSPC,
                    f"not enough space to write {self.destination}: needs about "
                    f"{expected_bytes / 1e9:.3f} GB, {free / 1e9:.3f} GB free on that file system",
                )
        self.staging = new_staging_dir(self.destination, dir_mode & 0o777 | 0o700)

    # -- public API ------------------------------------------------------------------------

    def add_tensor(
        self, name: str, dtype: str, shape: Iterable[int], pieces: Iterable[Buffer]
    ) -> None:
        """Append one tensor whose bytes arrive as `pieces` (any sizes; their sum must match)."""
        shape = [int(d) for d in shape]
        if name in self._names or name in self._aliases:
            raise ValueError(f"tensor {name!r} added twice")
        try:
            nbytes = tensor_nbytes(dtype, shape)
        except KeyError:
            raise FormatError(f"tensor {name!r}: unsupported dtype {dtype!r}") from None
        tensor_hash = xxhash.xxh3_64()
        with self._io_errors():
            out = self._file_for(nbytes)
            out.pad()
            offset = out.pos
            written = 0
            for piece in pieces:
                out.write(piece)
                tensor_hash.update(piece)
                n = memoryview(piece).nbytes
                written += n
                if self._on_bytes:
                    self._on_bytes(n)
        if written != nbytes:
            raise FormatError(
                f"tensor {name!r}: got {written} bytes, dtype {dtype} and shape {shape} "
                f"need {nbytes}"
            )
        self._names.add(name)
        self._tensors.append(
            TensorEntry(name=name, dtype=dtype, shape=shape, file=out.path.name, offset=offset,
                        bytes=nbytes, checksum=tensor_hash.hexdigest())
        )

    def add_alias(self, alias: str, target: str) -> None:
        """Record that `alias` is the same tensor as the stored `target` (tied weights)."""
        if alias in self._names or alias in self._aliases:
            raise ValueError(f"tensor {alias!r} added twice")
        self._aliases[alias] = target

    def copy_file(self, source: str | Path, name: str | None = None, *,
                  root: Path | None = None) -> None:
        """Copy a side file (config, tokenizer...) into the checkpoint with its permission bits.

        Only a regular file is copied, never through a link: a symlink is refused (FormatError)
        unless `root` is given and it points to a regular file inside that real directory (a
        hub cache's snapshot links into its blobs); FIFOs and devices are refused unopened.
        """
        name = name or Path(source).name
        if not name or name == INDEX_FILENAME or "/" in name or name.startswith("."):
            raise ValueError(f"refusing to copy a side file named {name!r}")
        with self._io_errors():  # a refused source (FormatError) leaves the writer usable
            copy_regular_file(Path(source), self.staging / name, root=root)

    def commit(self) -> Path:
        """Finish the data, write the index, and move the checkpoint into place atomically."""
        with self._io_errors():
            if self._current is not None:
                self._files.append(self._current.close())
                self._current = None
            index = Index(
                format=FORMAT_NAME,
                version=FORMAT_VERSION,
                layout=self.layout,
                alignment=ALIGNMENT,
                checksum={"algorithm": CHECKSUM_ALGORITHM, "chunk_bytes": self.chunk_bytes},
                files=self._files,
                tensors=self._tensors,
                aliases=self._aliases,
                source=self.source.model_copy(
                    update={
                        "converter": f"sllm_plugin {__version__}",
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    }
                ),
                engine=self.engine,
                metadata=self.metadata,
            )
            check_index(index, str(self.destination / INDEX_FILENAME))
            text = index.to_json().encode()
            if len(text) > MAX_INDEX_BYTES:
                raise FormatError(f"{self.destination}: the index would be {len(text)} bytes, "
                                  f"over the {MAX_INDEX_BYTES}-byte limit readers accept")
            for staged in self.staging.iterdir():
                if staged.suffix != ".bin":
                    with open(staged, "rb") as fh:
                        os.fsync(fh.fileno())
            index_path = self.staging / INDEX_FILENAME
            with create_file(index_path, self.file_mode) as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            commit_directory(self.staging, self.destination, self.overwrite)
        self._committed = True
        return self.destination

    def abort(self) -> None:
        """Remove everything this writer staged. Safe to call more than once."""
        if self._current is not None:
            self._current.abandon()
            self._current = None
        if not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()

    # -- internals -------------------------------------------------------------------------

    def _file_for(self, nbytes: int) -> _DataFileWriter:
        cur = self._current
        if cur is not None and cur.pos > 0 and align_up(cur.pos) + nbytes > self.partition_bytes:
            self._files.append(cur.close())
            cur = None
        if cur is None:
            cur = _DataFileWriter(self.staging / data_file_name(len(self._files)),
                                  self.chunk_bytes, self.file_mode)
            self._current = cur
        return cur

    @contextlib.contextmanager
    def _io_errors(self):
        try:
            yield
        except CheckpointExistsError:
            self.abort()
            raise
        except OSError as e:
            self.abort()
            what = e.filename or self.staging
            raise CheckpointWriteError(
                e.errno,
                f"writing checkpoint {self.destination} failed at {what}: "
                f"{e.strerror or e}; nothing was left behind",
            ) from e


# -- torch state dicts --------------------------------------------------------------------


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor (copied to contiguous CPU memory only if it is not already)."""
    import torch

    t = tensor.detach()
    if t.device.type == "meta":
        raise ValueError("cannot save a tensor on the meta device (it has no data)")
    t = t.to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    source: Source | None = None,
    layout: str = LAYOUT_HF,
    engine: EngineInfo | None = None,
) -> Path:
    """Save a state dict as an sllm checkpoint directory at `path`.

    Views and non-contiguous tensors are saved by value. Entries that are the very same tensor
    data (same storage, offset, shape, strides and dtype, as with tied embeddings) are stored once
    and recorded as aliases, so loading gives back one shared tensor.
    """
    import torch

    if not state_dict:
        raise ValueError("refusing to save an empty state dict")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if torch_dtype_name(t.dtype) not in DTYPE_ITEMSIZE:
            raise FormatError(f"tensor {name!r}: unsupported dtype {t.dtype}")
    expected = sum(align_up(t.numel() * t.element_size()) for t in state_dict.values())
    stored: dict[tuple, str] = {}
    with CheckpointWriter(
        path,
        overwrite=overwrite,
        layout=layout,
        chunk_bytes=chunk_bytes,
        partition_bytes=partition_bytes,
        source=source,
        engine=engine,
        metadata=metadata,
        expected_bytes=expected,
    ) as writer:
        for name, t in state_dict.items():
            key = _identity(t)
            if key is not None and key in stored:
                writer.add_alias(name, stored[key])
                continue
            writer.add_tensor(name, torch_dtype_name(t.dtype), t.shape, [tensor_bytes_view(t)])
            if key is not None:
                stored[key] = name
        return writer.commit()


def _identity(t: torch.Tensor) -> tuple | None:
    """What makes two entries the same tensor; None for empty tensors (they share no data)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )

