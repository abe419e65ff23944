"""Find the sllm checkpoint for what vLLM was pointed at, converting a plain model once.

`vllm serve X --load-format sllm` accepts three kinds of X:
- an sllm checkpoint directory (`hf` layout): loaded as it is;
- a directory with `rank-NNNNN/` sub-checkpoints (`engine` layout, from `sllm save-vllm`);
- a plain Hugging Face model (a local safetensors directory or a hub id): converted once into
  the cache directory, under a file lock so concurrent starts convert it once, then loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..format.convert import convert, resolve_source
from ..format.errors import FormatError
from ..format.reader import is_checkpoint, is_engine_checkpoint
from ..format.spec import ENGINE_RANK_DIR, LAYOUT_ENGINE, LAYOUT_HF

logger = logging.getLogger("vllm.sllm_plugin")



@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # the checkpoint (hf) or the directory holding rank-NNNNN/ (engine)
    layout: str
    converted: bool = False  # converted during this call


def rank_dir(path: Path, rank: int) -> Path:
    return path / ENGINE_RANK_DIR.format(rank=rank)


def cache_key(model: str, revision: str | None) -> str:
    """A directory name for a model in the cache: readable, and unique per source version.

    A local directory is keyed by its absolute path and the names, sizes and mtimes of its
    weight files, so an edited model is converted again rather than served stale.
    """
    path = Path(model)
    if path.exists():
        src = resolve_source(path)
        h = hashlib.sha256(str(path.resolve()).encode())
        for f in src.weight_files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        tag = "local-" + h.hexdigest()[:16]
        name = path.resolve().name
    else:
        tag = revision or "main"
        name = model
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"
    return f"{safe}--{re.sub(r'[^A-Za-z0-9._-]+', '-', tag)}"


def resolve_checkpoint(model: str, revision: str | None, cache_dir: Path) -> ResolvedCheckpoint:
    path = Path(model)
    if is_checkpoint(path):
        from ..format.index import read_index_file

        layout = read_index_file(path).layout
        if layout != LAYOUT_HF:
            raise FormatError(f"{path}: a {layout!r} checkpoint must be loaded from the "
                              f"directory above its rank-NNNNN/ sub-directories")
        return ResolvedCheckpoint(path, LAYOUT_HF)
    if path.is_dir() and is_engine_checkpoint(path):
        return ResolvedCheckpoint(path, LAYOUT_ENGINE)
    if revision is None and not path.exists():
        # Pin the hub revision to what the local hub cache resolves, so the key is stable.
        src = resolve_source(model)
        revision = src.revision
    target = cache_dir / cache_key(model, revision)
    if is_checkpoint(target):
        return ResolvedCheckpoint(target, LAYOUT_HF)
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir / f".{target.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocks while another process converts
        try:
            if is_checkpoint(target):
                return ResolvedCheckpoint(target, LAYOUT_HF)
            logger.info("sllm: converting %s into %s (once)", model, target)
            convert(model, target, revision=revision,
                    quiet=not os.isatty(2))
            return ResolvedCheckpoint(target, LAYOUT_HF, converted=True)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
