"""Getting a model from where it lives into a tier, as an sllm checkpoint.

A source is one of:
- a local sllm checkpoint directory, of either layout (an `engine` checkpoint from
  `sllm save-vllm` is the fastest to start): copied file by file (fsynced), then renamed;
- a local safetensors file or model directory, or a Hugging Face hub id: converted on the way
  in (format.convert; a hub id is downloaded through huggingface_hub and its cache first);
- an http(s) URL of an sllm checkpoint directory (for example another node's tier served over
  HTTP): the index, every data file it lists and the usual config/tokenizer files beside it.

Every path ends in a staging directory renamed into place, so a fetch killed half way leaves
nothing that looks like a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..format.convert import convert, resolve_source
from ..format.errors import FormatError
from ..format.index import Index
from ..format.reader import is_checkpoint, is_engine_checkpoint, open_model_checkpoints
from ..format.spec import INDEX_FILENAME, align_up
from ..format.writer import commit_directory, new_staging_dir
from .tiers import directory_bytes

_COPY_BLOCK = 16 * 1024 * 1024
# Files that make a checkpoint a complete model directory, tried beside a URL's index.
SIDE_FILE_NAMES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


class SourceError(ValueError):
    """The source cannot be read as a model; the message says what was wrong."""


@dataclass
class Fetch:
    """A source resolved far enough to know its size, and how to write it."""

    nbytes: int
    write: Callable[[Path], None]  # writes the checkpoint at the given destination, atomically
    kind: str  # "checkpoint", "convert" or "url"


def copy_checkpoint(src: Path, destination: Path) -> None:
    """Copy a checkpoint directory of either layout (validated first) to `destination`
    atomically."""
    open_model_checkpoints(src)
    staging = new_staging_dir(destination)
    try:
        for path in sorted(src.rglob("*")):
            target = staging / path.relative_to(src)
            if path.is_dir():
                target.mkdir(exist_ok=True)
                continue
            with open(path, "rb") as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_BLOCK)
                fout.flush()
                os.fsync(fout.fileno())
        open_model_checkpoints(staging)  # what landed is whole
        commit_directory(staging, destination, overwrite=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_fetch(source: str, revision: str | None = None) -> Fetch:
    """Find out what `source` is and how big its checkpoint will be. Raises SourceError."""
    if source.startswith(("http://", "https://")):
        return _url_fetch(source.rstrip("/"))
    path = Path(source).expanduser()
    if path.is_dir() and (is_checkpoint(path) or is_engine_checkpoint(path)):
        return Fetch(directory_bytes(path), lambda dst: copy_checkpoint(path, dst), "checkpoint")
    try:
        resolved = resolve_source(str(path) if path.exists() else source, revision)
    except (FileNotFoundError, FormatError) as e:
        raise SourceError(str(e)) from None
    from ..format.safetensors_source import read_safetensors_header

    nbytes = sum(p.stat().st_size for p in resolved.side_files) + 64 * 1024
    for weights in resolved.weight_files:
        tensors, _ = read_safetensors_header(weights)
        nbytes += sum(align_up(t.nbytes) for t in tensors)

    def write(dst: Path) -> None:
        convert(source if not path.exists() else path, dst, revision=revision, quiet=True)

    return Fetch(nbytes, write, "convert")


def _url_fetch(url: str) -> Fetch:
    import httpx

    try:
        response = httpx.get(f"{url}/{INDEX_FILENAME}", timeout=30, follow_redirects=True)
    except httpx.HTTPError as e:
        raise SourceError(f"{url}: cannot reach the source ({type(e).__name__}: {e})") from None
    if response.status_code != 200:
        raise SourceError(f"{url}/{INDEX_FILENAME}: HTTP {response.status_code}; URL sources "
                          "must be sllm checkpoint directories served over HTTP")
    try:
        index = Index.model_validate_json(response.content)
    except ValueError as e:
        raise SourceError(f"{url}/{INDEX_FILENAME}: not a valid sllm index ({e})") from None
    raw_index = response.content

    def write(dst: Path) -> None:
        staging = new_staging_dir(dst)
        try:
            with httpx.Client(timeout=httpx.Timeout(60, connect=10), follow_redirects=True,
                              transport=httpx.HTTPTransport(retries=3)) as client:
                for f in index.files:
                    _download(client, f"{url}/{f.name}", staging / f.name, f.bytes)
                for name in SIDE_FILE_NAMES:
                    _download(client, f"{url}/{name}", staging / name, None, optional=True)
            (staging / INDEX_FILENAME).write_bytes(raw_index)
            open_model_checkpoints(staging)
            commit_directory(staging, dst, overwrite=False)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    return Fetch(index.total_bytes + len(raw_index) + 1024 * 1024, write, "url")


def _download(client, url: str, target: Path, expected: int | None,
              optional: bool = False) -> None:
    import httpx

    try:
        with client.stream("GET", url) as response:
            if optional and response.status_code == 404:
                return
            if response.status_code != 200:
                raise SourceError(f"{url}: HTTP {response.status_code}")
            with open(target, "wb") as out:
                for block in response.iter_bytes(_COPY_BLOCK):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
    except httpx.HTTPError as e:
        raise SourceError(f"{url}: download failed ({type(e).__name__}: {e})") from None
    if expected is not None and target.stat().st_size != expected:
        raise SourceError(f"{url}: got {target.stat().st_size} bytes, the index lists {expected}")
