"""Where each tensor's bytes sit in a .safetensors file, so the converter can stream them.

The `safetensors` library reads tensors but does not expose their byte offsets, and going
through it means either mmap (resident pages count against the process, which breaks the
converter's bounded-memory promise) or whole tensors in RAM. The format is one documented
header: 8 bytes little-endian length, then JSON {name: {dtype, shape, data_offsets}} and an
optional "__metadata__"; we parse it with `json` and validate every entry.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError
from .safefs import open_file
from .spec import DTYPE_ITEMSIZE, shape_problem, tensor_nbytes

#: safetensors dtype code -> our (torch) dtype name.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
assert set(SAFETENSORS_DTYPES.values()) <= set(DTYPE_ITEMSIZE)

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsTensor:
    name: str
    dtype: str  # our name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: str | Path) -> tuple[list[SafetensorsTensor], dict[str, str]]:
    """Tensors of one .safetensors file in file order, and its metadata. Raises FormatError
    for anything malformed (types included), and never blocks on a FIFO."""
    path = Path(path)
    with os.fdopen(open_file(path, "weight file"), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise FormatError(f"{path}: safetensors header length {header_len} is invalid")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep, a huge integer
        raise FormatError(f"{path}: safetensors header is not valid JSON: "
                          f"{str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: safetensors __metadata__ is not a JSON object")
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        shown = repr(name[:100])
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: tensor {shown}: malformed header entry") from None
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise FormatError(f"{path}: tensor {shown}: unsupported safetensors dtype "
                              f"{str(code)[:20]!r}")
        dtype = SAFETENSORS_DTYPES[code]
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or shape_problem(shape)):
            raise FormatError(f"{path}: tensor {shown}: invalid shape {str(shape)[:100]}")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)):
            raise FormatError(f"{path}: tensor {shown}: data_offsets must be integers")
        nbytes = tensor_nbytes(dtype, shape)
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise FormatError(
                f"{path}: tensor {shown}: data_offsets [{begin}, {end}) do not fit dtype {code} "
                f"shape {str(shape)[:100]} in a file of {size} bytes"
            )
        tensors.append(SafetensorsTensor(name, dtype, tuple(shape), data_start + begin, nbytes))
    tensors.sort(key=lambda t: t.start)
    return tensors, {str(k): str(v) for k, v in metadata.items()}
