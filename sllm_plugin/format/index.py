"""The index file: its schema (pydantic) and every check that needs only the index itself.

Checks that need the data files (existence, sizes, symlinks, checksums) live in reader.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FormatError
from .spec import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    DATA_FILE_PATTERN,
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    LAYOUT_ENGINE,
    LAYOUTS,
    MAX_INDEX_BYTES,
    shape_problem,
    tensor_nbytes,
)


class _Strict(BaseModel):
    # A field we do not know means a writer newer than us: refuse rather than misread.
    # Strict: an offset of 4096.0, "4096" or true is a malformed index, not a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ChecksumSpec(_Strict):
    algorithm: str = CHECKSUM_ALGORITHM
    chunk_bytes: int = Field(gt=0)


class DataFile(_Strict):
    name: str
    bytes: int = Field(ge=0)
    #: One 16-hex-digit XXH3-64 per `chunk_bytes` region of the file, in order.
    checksums: list[str]


class TensorEntry(_Strict):
    name: str
    dtype: str
    shape: list[int]
    file: str
    offset: int = Field(ge=0)
    bytes: int = Field(ge=0)
    #: XXH3-64 of the tensor's own bytes: pins a chunk mismatch down to the tensors it hit.
    checksum: str


class Source(_Strict):
    model_id: str | None = None
    revision: str | None = None
    converted_from: str | None = None
    converter: str | None = None
    created: str | None = None


class EngineInfo(_Strict):
    """What an `engine` layout checkpoint is tied to; a mismatch at load time is an error."""

    engine: str = "vllm"
    engine_version: str
    tensor_parallel_size: int = Field(ge=1)
    rank: int = Field(ge=0)
    dtype: str
    quantization: str | None = None
    model: str | None = None


class Index(_Strict):
    format: str
    version: int
    layout: str
    alignment: int
    checksum: ChecksumSpec
    files: list[DataFile]
    tensors: list[TensorEntry]
    aliases: dict[str, str] = Field(default_factory=dict)
    source: Source = Field(default_factory=Source)
    engine: EngineInfo | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files, padding included: what a full load reads."""
        return sum(f.bytes for f in self.files)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def parse_index(text: str | bytes, where: str = INDEX_FILENAME) -> Index:
    """Parse and fully validate an index; any problem raises FormatError naming `where`.

    Nothing else escapes: deep nesting, integers too long for Python's parser, and anything
    the schema or the semantic checks dislike all become FormatError.
    """
    if len(text) > MAX_INDEX_BYTES:
        raise FormatError(f"{where}: index is {len(text)} bytes, over the {MAX_INDEX_BYTES}-byte "
                          "limit")
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5000-digit int
        raise FormatError(f"{where}: index is not valid JSON: {_clip(e)}") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: index must be a JSON object, got {type(raw).__name__}")
    # Version first: a newer file may legitimately have fields this reader does not know.
    if raw.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not an sllm index (format={_clip(raw.get('format'))})")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{where}: missing or non-integer format version ({_clip(version)})")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: format version {_clip(version)} is newer than this reader supports "
            f"({FORMAT_VERSION}); upgrade sllm_plugin"
        )
    if version < 1:
        raise FormatError(f"{where}: invalid format version {_clip(version)}")
    try:
        index = Index.model_validate_json(text)
    except ValidationError as e:
        raise FormatError(f"{where}: invalid index: {_describe(e, raw)}") from None
    check_index(index, where)
    return index


def quote(value: Any) -> str:
    """A name or shape quoted for an error message, at most 100 characters."""
    return _clip(value, 100)


def _clip(value: Any, limit: int = 60) -> str:
    """A bounded repr for error messages: an index may hold megabytes in one field."""
    try:
        text = repr(value) if not isinstance(value, BaseException) else str(value)
    except (ValueError, RecursionError):  # a 5000-digit int, a 1000-deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: ValidationError, raw: dict) -> str:
    """One line per problem (the first ten), naming the tensor or file rather than its index."""
    parts = []
    errors = error.errors()
    for err in errors[:10]:
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 2 and loc[0] in ("tensors", "files") and loc[1].isdigit():
            with contextlib.suppress(KeyError, IndexError, TypeError):
                loc[1] = _clip(raw[loc[0]][int(loc[1])]["name"])
        parts.append(f"{'.'.join(loc)[:200]}: {err['msg']} (got {_clip(err.get('input'))})")
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more")
    return "; ".join(parts)


def check_index(index: Index, where: str = INDEX_FILENAME) -> None:
    """Semantic checks: names, dtypes, shapes, extents, overlaps, chunk tables, aliases.

    Messages quote names through `_q` (clipped): a hostile index may hold megabyte names.
    """
    if index.layout not in LAYOUTS:
        raise FormatError(f"{where}: unknown layout {quote(index.layout)} "
                          f"(expected one of {LAYOUTS})")
    if (index.layout == LAYOUT_ENGINE) != (index.engine is not None):
        raise FormatError(f"{where}: the 'engine' section is required for layout 'engine' "
                          "and only for it")
    if index.engine is not None and index.engine.rank >= index.engine.tensor_parallel_size:
        raise FormatError(f"{where}: engine rank {index.engine.rank} is out of range for "
                          f"tensor_parallel_size {index.engine.tensor_parallel_size}")
    if index.alignment != ALIGNMENT:
        raise FormatError(f"{where}: alignment {index.alignment} is not {ALIGNMENT}")
    if index.checksum.algorithm != CHECKSUM_ALGORITHM:
        raise FormatError(f"{where}: unknown checksum algorithm {quote(index.checksum.algorithm)}")
    chunk = index.checksum.chunk_bytes
    if chunk % ALIGNMENT:
        raise FormatError(f"{where}: checksum chunk_bytes {chunk} is not a multiple of {ALIGNMENT}")
    if not index.tensors:
        raise FormatError(f"{where}: the checkpoint holds no tensors")

    files: dict[str, DataFile] = {}
    for f in index.files:
        name = quote(f.name)
        if not DATA_FILE_PATTERN.fullmatch(f.name):
            raise FormatError(f"{where}: illegal data file name {name} (must be a plain name)")
        if f.name in files:
            raise FormatError(f"{where}: data file {name} listed twice")
        if f.bytes % ALIGNMENT:
            raise FormatError(f"{where}: data file {name} size {f.bytes} is not 4 KiB-aligned")
        expected_chunks = -(-f.bytes // chunk)
        if len(f.checksums) != expected_chunks:
            raise FormatError(
                f"{where}: data file {name} has {len(f.checksums)} checksums, expected "
                f"{expected_chunks} ({f.bytes} bytes / {chunk}-byte chunks)"
            )
        for c in f.checksums:
            if not _is_checksum(c):
                raise FormatError(f"{where}: data file {name}: malformed checksum {quote(c)}")
        files[f.name] = f

    seen: set[str] = set()
    extents: dict[str, list[tuple[int, int, str]]] = {name: [] for name in files}
    for t in index.tensors:
        name = quote(t.name)
        if not t.name:
            raise FormatError(f"{where}: a tensor has an empty name")
        if t.name in seen:
            raise FormatError(f"{where}: tensor {name} listed twice")
        seen.add(t.name)
        if not _is_checksum(t.checksum):
            raise FormatError(f"{where}: tensor {name}: malformed checksum {quote(t.checksum)}")
        if t.dtype not in DTYPE_ITEMSIZE:
            raise FormatError(f"{where}: tensor {name} has unknown dtype {quote(t.dtype)}")
        problem = shape_problem(t.shape)
        if problem:
            raise FormatError(f"{where}: tensor {name} has {problem} {quote(t.shape)}")
        if t.file not in files:
            raise FormatError(f"{where}: tensor {name} refers to unlisted file {quote(t.file)}")
        expected = tensor_nbytes(t.dtype, t.shape)
        if t.bytes != expected:
            raise FormatError(
                f"{where}: tensor {name}: {t.bytes} bytes recorded but dtype {t.dtype} and "
                f"shape {quote(t.shape)} need {expected}"
            )
        if t.offset % ALIGNMENT:
            raise FormatError(f"{where}: tensor {name} offset {t.offset} is not 4 KiB-aligned")
        if t.offset + t.bytes > files[t.file].bytes:
            raise FormatError(
                f"{where}: tensor {name} extent [{t.offset}, {t.offset + t.bytes}) lies "
                f"outside {t.file!r} ({files[t.file].bytes} bytes)"
            )
        if t.bytes:
            extents[t.file].append((t.offset, t.offset + t.bytes, t.name))
    for fname, spans in extents.items():
        spans.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise FormatError(
                    f"{where}: tensors {quote(name_a)} and {quote(name_b)} overlap in {fname!r}"
                )

    for alias, target in index.aliases.items():
        if not alias:
            raise FormatError(f"{where}: an alias has an empty name")
        if alias in seen:
            raise FormatError(f"{where}: alias {quote(alias)} is also a stored tensor")
        if target not in seen:
            raise FormatError(f"{where}: alias {quote(alias)} points to unknown tensor "
                              f"{quote(target)}")


def _is_checksum(text: str) -> bool:
    return len(text) == 16 and all(ch in "0123456789abcdef" for ch in text)


def read_index_file(checkpoint_dir: str | Path) -> Index:
    """Read and validate `checkpoint_dir`'s index. The index must be a regular file of at most
    MAX_INDEX_BYTES; a symlink is followed only to a file inside the checkpoint directory.
    Raises FormatError and nothing else."""
    from .safefs import read_regular, real_directory

    path = Path(checkpoint_dir) / INDEX_FILENAME
    if not os.path.lexists(path):
        raise FormatError(f"{path}: no sllm index here; is this an sllm checkpoint?")
    root = real_directory(checkpoint_dir, "checkpoint directory")
    text = read_regular(path, "index file", MAX_INDEX_BYTES, root=root)
    return parse_index(text, str(path))
