"""Convert a safetensors model (file, directory, or Hugging Face hub id) into an sllm checkpoint.

Bytes are streamed from the source files through one bounded buffer into the writer, so memory
stays flat whatever the model size, and no torch is needed: safetensors already stores
little-endian row-major tensors, exactly our layout, so conversion is a re-alignment.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import FormatError
from .index import Source
from .reader import is_checkpoint, is_engine_checkpoint
from .safefs import open_file, read_regular, real_directory, resolve_inside, stat_regular
from .safetensors_source import SafetensorsTensor, read_safetensors_header
from .shape import shape_metadata, shape_of_files
from .spec import DEFAULT_CHUNK_BYTES, DEFAULT_PARTITION_BYTES, INDEX_FILENAME, align_up
from .writer import CheckpointWriter, check_destination

logger = logging.getLogger("sllm_plugin")

SAFETENSORS_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".pkl"}
_WEIGHT_INDEXES = {SAFETENSORS_INDEX, "pytorch_model.bin.index.json", INDEX_FILENAME}
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
_COPY_BUFFER = 16 * 1024 * 1024
_MAX_JSON = 64 * 1024 * 1024
_SOURCE = "the source directory"


@dataclass
class ResolvedSource:
    """What a conversion reads: the weight files, the side files to copy, and where from.

    Every path is inside `directory`, and a symlink among them points to a regular file
    inside `root` (checked here; each file is opened non-blocking and checked again to be a
    regular file). The one exception is a single weight file named as the source itself.
    """

    weight_files: list[Path]
    side_files: list[Path] = field(default_factory=list)
    model_id: str | None = None
    revision: str | None = None
    #: the source directory (a single file's parent); the checkpoint is no more open than it
    directory: Path | None = None
    #: the real directory symlinks may point into: the source directory itself, or for a
    #: Hugging Face cache snapshot the model's cache directory (whose blobs/ the links target)
    root: Path | None = None


def resolve_source(src: str | Path, revision: str | None = None) -> ResolvedSource:
    """Find the safetensors files of `src`: a file, a model directory, or a hub id."""
    path = Path(src)
    if path.is_dir() and (is_checkpoint(path) or is_engine_checkpoint(path)):
        raise FormatError(_already_sllm(path))
    if path.is_file():
        if path.suffix != ".safetensors":
            hint = (f"; {path.parent} is an sllm checkpoint already, nothing to convert"
                    if is_checkpoint(path.parent) else "")
            raise FormatError(f"{path}: only .safetensors files can be converted{hint}")
        # The file named is the source itself: a link to it is the caller's choice (as for a
        # source directory); the side files beside it follow the rules of side_files.
        try:
            real = Path(os.path.realpath(path, strict=True))
        except OSError as e:
            raise FormatError(f"{path}: cannot resolve the weight file: {e.strerror}") from None
        stat_regular(real, "weight file")
        directory = path.parent
        root = source_root(directory)
        return ResolvedSource([path], side_files(directory, root), model_id=str(src),
                              directory=directory, root=root)
    if path.is_dir():
        root = source_root(path)
        return ResolvedSource(_weight_files(path, root), side_files(path, root),
                              model_id=str(src), directory=path, root=root)
    if _looks_like_hub_id(str(src)):
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(str(src), revision=revision,
                                           allow_patterns=_HUB_PATTERNS))
        except Exception as e:  # the hub client raises many types; all mean "not available"
            raise FileNotFoundError(
                f"{src}: not a local path, and the Hugging Face hub could not provide it "
                f"({type(e).__name__}: {e})"
            ) from e
        root = source_root(local)
        return ResolvedSource(_weight_files(local, root), side_files(local, root),
                              model_id=str(src), revision=local.name, directory=local,
                              root=root)
    raise FileNotFoundError(f"{src}: no such file or directory, and not a hub id")


def _already_sllm(path: Path) -> str:
    layout = "engine" if is_engine_checkpoint(path) else "hf"
    return (
        f"{path} is already an sllm checkpoint ({layout} layout); there is nothing to "
        "convert. Use it as it is (load it, serve it with --load-format sllm, or fetch it "
        "into a node), or copy the directory as a whole (cp -r) to put it elsewhere."
    )


def source_root(directory: Path) -> Path:
    """The real directory a source's symlinks may point into.

    A Hugging Face cache snapshot (`.../models--org--name/snapshots/<commit>/`) is a tree of
    symlinks into the model's `blobs/` beside it, so for a snapshot the root is the model's
    cache directory; for any other directory it is the directory itself. Either way a link
    to anything else (`/etc/shadow`, another model, a FIFO) is refused.
    """
    real = real_directory(directory, "source directory")
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not s.startswith(("/", "~"))
    )


def _weight_files(directory: Path, root: Path) -> list[Path]:
    index_path = directory / SAFETENSORS_INDEX
    if os.path.lexists(index_path):
        text = read_regular(index_path, "safetensors index", _MAX_JSON, root=root,
                            container=_SOURCE)
        try:
            weight_map = json.loads(text)["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise FormatError(f"{index_path}: malformed safetensors index "
                              f"({type(e).__name__})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{index_path}: malformed safetensors index (weight_map must map "
                              "tensor names to file names)")
        paths = []
        for name in sorted(set(weight_map.values())):
            if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
                raise FormatError(f"{index_path}: shard name {name[:100]!r} escapes the directory")
            p = directory / name
            if not os.path.lexists(p):
                raise FormatError(f"{index_path}: shard {name[:100]!r} is missing")
            stat_regular(p, "weight file", root=root, container=_SOURCE)
            paths.append(p)
        return paths
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        hint = (
            f" (found {other}: re-save with transformers save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise FormatError(f"{directory}: no .safetensors weights to convert{hint}")
    for p in files:
        stat_regular(p, "weight file", root=root, container=_SOURCE)
    return files


def side_files(directory: Path, root: Path | None = None) -> list[Path]:
    """Config, tokenizer and other small files that make the output a complete model dir.

    Regular files only: directories, FIFOs, sockets and devices are not side files and are
    passed over. A symlink is taken only when it points to a regular file inside `root`
    (default: `source_root(directory)`); one pointing anywhere else, dangling or looping
    makes this a FormatError naming it, rather than a copy of whatever it points to.
    """
    root = root if root is not None else source_root(directory)
    found = []
    for p in sorted(directory.iterdir()):
        if (p.name.startswith(".") or p.suffix in _WEIGHT_SUFFIXES
                or p.name in _WEIGHT_INDEXES):
            continue
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError as e:
            raise FormatError(f"{p}: cannot stat side file: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            real = resolve_inside(p, root, "side file (a symlink)", _SOURCE)
            try:
                is_regular = stat.S_ISREG(os.stat(real, follow_symlinks=False).st_mode)
            except OSError as e:
                raise FormatError(f"{p}: cannot stat side file: {e.strerror or e}") from None
            if is_regular:
                found.append(p)
            else:
                logger.warning("%s: not copied: a symlink to something other than a file", p)
        elif stat.S_ISREG(st.st_mode):
            found.append(p)
        elif not stat.S_ISDIR(st.st_mode):
            logger.warning("%s: not copied: not a regular file", p)
    return found


def _stream(path: Path, tensor: SafetensorsTensor, buf: bytearray) -> Iterator[memoryview]:
    """Yield a tensor's bytes in pieces of at most len(buf), reusing one buffer."""
    view = memoryview(buf)
    with os.fdopen(open_file(path, "weight file"), "rb", buffering=0) as f:
        f.seek(tensor.start)
        left = tensor.nbytes
        while left:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise FormatError(f"{path}: tensor {tensor.name!r} is truncated")
            left -= n
            yield view[:n]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    revision: str | None = None,
    quiet: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
) -> Path:
    """Convert `src` into an sllm checkpoint directory at `dst` (atomically) and return it.

    The checkpoint keeps its source's permissions (less the umask): data files and index get
    the weight files' bits (the strictest, if they differ), each side file its own, the
    directory the source directory's, so a private model is not published by converting it.
    """
    # Before anything is read, downloaded or drawn: an existing checkpoint is refused first.
    check_destination(Path(dst), overwrite)
    source = resolve_source(src, revision)
    plan: list[tuple[Path, SafetensorsTensor]] = []
    seen: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    file_mode = 0o777
    for path in source.weight_files:
        tensors, meta = read_safetensors_header(path)
        file_mode &= os.stat(path).st_mode
        metadata.update(meta)
        for t in tensors:
            if t.name in seen:
                raise FormatError(f"tensor {t.name!r} appears in both {seen[t.name]} and {path}")
            seen[t.name] = path
            plan.append((path, t))
    if not plan:
        raise FormatError(f"{src}: the safetensors files hold no tensors")
    total = sum(t.nbytes for _, t in plan)
    side_bytes = sum(p.stat().st_size for p in source.side_files)
    expected = sum(align_up(t.nbytes) for _, t in plan) + side_bytes
    dir_mode = os.stat(source.directory).st_mode if source.directory is not None else 0o777

    started = time.perf_counter()
    buf = bytearray(min(_COPY_BUFFER, max(t.nbytes for _, t in plan)) or 1)
    # The writer first: its checks (destination, free space) refuse before a bar is drawn.
    with CheckpointWriter(
        dst,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        partition_bytes=partition_bytes,
        source=Source(model_id=source.model_id, revision=source.revision,
                      converted_from="safetensors"),
        metadata=metadata,
        expected_bytes=expected,
        on_bytes=lambda n: bar.update(n),
        file_mode=file_mode,
        dir_mode=dir_mode,
    ) as writer, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                      disable=quiet, desc=f"convert {Path(str(dst)).name}",
                      dynamic_ncols=True) as bar:
        for path, t in plan:
            writer.add_tensor(t.name, t.dtype, t.shape, _stream(path, t, buf))
        for side in source.side_files:
            writer.copy_file(side, root=source.root)
        # From the staged files, exactly what is committed; replaces any value the source's
        # safetensors metadata carried.
        shape = shape_of_files(writer.staging, {t.dtype for _, t in plan})
        writer.metadata.update(shape_metadata(shape))
        out = writer.commit()
    seconds = time.perf_counter() - started
    logger.info(
        "converted %s -> %s: %d tensors, %.3f GB in %.2f s (%.2f GB/s)",
        src, out, len(plan), total / 1e9, seconds, total / 1e9 / max(seconds, 1e-9),
    )
    return out
