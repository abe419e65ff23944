"""The sllm checkpoint format: spec constants, index model, reader, writer and converter.

See docs/FORMAT.md for the byte-level specification. Nothing in this package imports torch at
module level.
"""

from .convert import convert
from .errors import CheckpointExistsError, CheckpointWriteError, FormatError
from .index import Index, parse_index, read_index_file
from .reader import Checkpoint, is_checkpoint, open_checkpoint
from .writer import CheckpointWriter, save_state_dict

__all__ = [
    "Checkpoint",
    "CheckpointExistsError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "FormatError",
    "Index",
    "convert",
    "is_checkpoint",
    "open_checkpoint",
    "parse_index",
    "read_index_file",
    "save_state_dict",
]
