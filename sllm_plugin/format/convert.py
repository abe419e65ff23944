"""Convert a safetensors model (file, directory, or Hugging Face hub id) into an sllm checkpoint.

Bytes are streamed from the source files through one bounded buffer into the writer, so memory
stays flat whatever the model size, and no torch is needed: safetensors already stores
little-endian row-major tensors, exactly our layout, so conversion is a re-alignment.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import FormatError
from .index import Source
from .safetensors_source import SafetensorsTensor, read_safetensors_header
from .spec import DEFAULT_CHUNK_BYTES, DEFAULT_PARTITION_BYTES, INDEX_FILENAME, align_up
from .writer import CheckpointWriter

logger = logging.getLogger("sllm_plugin")

SAFETENSORS_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".pkl"}
_WEIGHT_INDEXES = {SAFETENSORS_INDEX, "pytorch_model.bin.index.json", INDEX_FILENAME}
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
_COPY_BUFFER = 16 * 1024 * 1024


@dataclass
class ResolvedSource:
    """What a conversion reads: the weight files, the side files to copy, and where from."""

    weight_files: list[Path]
    side_files: list[Path] = field(default_factory=list)
    model_id: str | None = None
    revision: str | None = None


def resolve_source(src: str | Path, revision: str | None = None) -> ResolvedSource:
    """Find the safetensors files of `src`: a file, a model directory, or a hub id."""
    path = Path(src)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: only .safetensors files can be converted")
        return ResolvedSource([path], side_files(path.parent), model_id=str(src))
    if path.is_dir():
        return ResolvedSource(_weight_files(path), side_files(path), model_id=str(src))
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
        return ResolvedSource(_weight_files(local), side_files(local), model_id=str(src),
                              revision=local.name)
    raise FileNotFoundError(f"{src}: no such file or directory, and not a hub id")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not s.startswith(("/", "~"))
    )


def _weight_files(directory: Path) -> list[Path]:
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index_path}: malformed safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        paths = []
        for name in files:
            p = directory / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise FormatError(f"{index_path}: shard name {name!r} escapes the directory")
            if not p.is_file():
                raise FormatError(f"{index_path}: shard {name!r} is missing")
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
    return files


def side_files(directory: Path) -> list[Path]:
    """Config, tokenizer and other small files that make the output a complete model dir."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix not in _WEIGHT_SUFFIXES
        and p.name not in _WEIGHT_INDEXES
    )


def _stream(path: Path, tensor: SafetensorsTensor, buf: bytearray) -> Iterator[memoryview]:
    """Yield a tensor's bytes in pieces of at most len(buf), reusing one buffer."""
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
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
    """Convert `src` into an sllm checkpoint directory at `dst` (atomically) and return it."""
    source = resolve_source(src, revision)
    plan: list[tuple[Path, SafetensorsTensor]] = []
    seen: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for path in source.weight_files:
        tensors, meta = read_safetensors_header(path)
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

    started = time.perf_counter()
    buf = bytearray(min(_COPY_BUFFER, max(t.nbytes for _, t in plan)) or 1)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
              desc=f"convert {Path(str(dst)).name}", dynamic_ncols=True) as bar, CheckpointWriter(
        dst,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        partition_bytes=partition_bytes,
        source=Source(model_id=source.model_id, revision=source.revision,
                      converted_from="safetensors"),
        metadata=metadata,
        expected_bytes=expected,
        on_bytes=bar.update,
    ) as writer:
        for path, t in plan:
            writer.add_tensor(t.name, t.dtype, t.shape, _stream(path, t, buf))
        for side in source.side_files:
            writer.copy_file(side)
        out = writer.commit()
    seconds = time.perf_counter() - started
    logger.info(
        "converted %s -> %s: %d tensors, %.3f GB in %.2f s (%.2f GB/s)",
        src, out, len(plan), total / 1e9, seconds, total / 1e9 / max(seconds, 1e-9),
    )
    return out
