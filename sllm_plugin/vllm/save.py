"""`sllm save-vllm`: write an `engine` layout checkpoint from a running vLLM.

vLLM is started once with our loader and a `save_engine_to` directory; each tensor-parallel
worker saves its own shard of the parameters right after loading, before vLLM's
post-processing, into rank-NNNNN/. The whole directory is staged and renamed into place only
after every rank has written, so a failed save leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..format.convert import resolve_source, side_files, source_root
from ..format.errors import FormatError
from ..format.index import read_index_file
from ..format.reader import is_checkpoint, open_checkpoint
from ..format.shape import checkpoint_shape, shape_metadata
from ..format.spec import INDEX_FILENAME
from ..format.writer import (
    check_destination,
    commit_directory,
    copy_regular_file,
    create_file,
    new_staging_dir,
)
from .resolve import rank_dir


def save_vllm(
    model: str,
    destination: str | Path,
    *,
    tensor_parallel_size: int = 1,
    overwrite: bool = False,
    **engine_args: Any,
) -> Path:
    """Start vLLM on `model` (an sllm checkpoint, a safetensors model or a hub id), capture every
    rank's tensors, and return the engine checkpoint directory."""
    destination = Path(destination).absolute()
    check_destination(destination, overwrite)
    staging = new_staging_dir(destination)
    try:
        from vllm import LLM

        llm = LLM(
            model=model,
            load_format="sllm",
            model_loader_extra_config={"save_engine_to": str(staging)},
            tensor_parallel_size=tensor_parallel_size,
            **{"enforce_eager": True, **engine_args},
        )
        del llm
        for rank in range(tensor_parallel_size):
            open_checkpoint(rank_dir(staging, rank))  # every rank wrote a valid checkpoint
        src = Path(model)
        if src.is_dir() or is_checkpoint(src):
            root = source_root(src)
            sides = side_files(src, root)
        else:
            resolved = resolve_source(model)
            root, sides = resolved.root, resolved.side_files
        for side in sides:  # regular files only, never through a link out of the source
            copy_regular_file(side, staging / side.name, root=root)
        record_shape(staging, tensor_parallel_size)
        commit_directory(staging, destination, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def record_shape(staging: Path, tensor_parallel_size: int) -> None:
    """Add the engine shape of a staged engine checkpoint (its side files are in place) to
    every rank's index metadata; the staging directory is ours alone until committed."""
    shape = shape_metadata(checkpoint_shape(staging))
    for rank in range(tensor_parallel_size):
        path = rank_dir(staging, rank) / INDEX_FILENAME
        index = read_index_file(path.parent)
        text = index.model_copy(update={"metadata": {**index.metadata, **shape}}).to_json()
        fresh = path.with_name(INDEX_FILENAME + ".new")
        with create_file(fresh, os.stat(path).st_mode & 0o777) as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(fresh, path)


__all__ = ["FormatError", "record_shape", "save_vllm"]
