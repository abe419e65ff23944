"""Constants of the on-disk format, version 1. docs/FORMAT.md is the prose of this module.

Nothing here imports torch: the format is plain bytes and JSON, so the converter, the node store
and the CLI can handle checkpoints on machines (or in processes) that never load a tensor.
"""

from __future__ import annotations

import re

FORMAT_NAME = "sllm"
FORMAT_VERSION = 1
INDEX_FILENAME = "sllm-index.json"

#: Tensors start at multiples of this, and data files are padded to a multiple of it, so every
#: read the loader issues is O_DIRECT-safe (block and page aligned) without special cases.
ALIGNMENT = 4096

#: Default size of a checksummed region of a data file (also the default read unit).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
#: Default maximum size of one data file; a tensor is never split across files.
DEFAULT_PARTITION_BYTES = 4 * 1024**3

CHECKSUM_ALGORITHM = "xxh3-64"

LAYOUT_HF = "hf"
LAYOUT_ENGINE = "engine"
LAYOUTS = (LAYOUT_HF, LAYOUT_ENGINE)
#: An engine-layout checkpoint holds one complete checkpoint per tensor-parallel rank here.
ENGINE_RANK_DIR = "rank-{rank:05d}"

#: The largest index a reader accepts (and a writer writes). Real indexes are far smaller (about
#: 300 bytes per tensor: 200k tensors fit); the cap bounds the memory a hostile index can make
#: the JSON parser and the schema allocate before anything is checked.
MAX_INDEX_BYTES = 64 * 1024 * 1024

#: Every dimension, and the product of the non-zero dimensions, must be below this: torch keeps
#: sizes, strides and element counts in int64 and fails (with RuntimeError or OverflowError,
#: not a format error) on a shape it cannot represent, even an empty one.
MAX_ELEMENTS = 2**63

#: A data file name (matched whole): no directory part, no leading dot, ends in ".bin", nothing
#: a shell or a path join could reinterpret. Checked before any file is opened.
DATA_FILE_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,250}\.bin")


def data_file_name(index: int) -> str:
    return f"data-{index:05d}.bin"


#: Every dtype a checkpoint may hold: name -> bytes per element (little-endian, row-major).
#: The names are torch's own (`str(torch.float8_e4m3fn)` without the "torch." prefix).
#: float4_e2m1fn_x2 packs two 4-bit values per byte; its shape counts bytes, as in torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex64": 8,
    "complex128": 16,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def shape_problem(shape: tuple[int, ...] | list[int]) -> str | None:
    """Why torch could not hold a tensor of this shape (None: it can). Checked before any view."""
    product = 1
    for dim in shape:
        if dim < 0:
            return "a negative dimension"
        product *= max(dim, 1)
        if product >= MAX_ELEMENTS:
            return "too many elements for torch (the non-zero dimensions multiply to 2**63 or more)"
    return None


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    n = DTYPE_ITEMSIZE[dtype]
    for dim in shape:
        n *= dim
    return n
