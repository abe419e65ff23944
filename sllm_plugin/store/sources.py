"""Getting a model from where it lives into a tier, as an sllm checkpoint.

A source is one of:
- a local sllm checkpoint directory, of either layout (an `engine` checkpoint from
  `sllm save-vllm` is the fastest to start): copied file by file (fsynced), then renamed;
- a local safetensors file or model directory, or a Hugging Face hub id: converted on the way
  in (format.convert; a hub id is downloaded through huggingface_hub and its cache first);
- an http(s) URL of an sllm checkpoint directory of either layout (for example another node's
  tier served over HTTP): its index (or each rank's, `rank-NNNNN/sllm-index.json`), every data
  file listed there and the usual config/tokenizer files beside it.

Every path ends in a private staging directory renamed into place, so a fetch killed half way
leaves nothing that looks like a checkpoint. Every source is hostile until validated:
- a local checkpoint is copied only if it holds nothing but regular files and directories
  (a link could pull any file the daemon can read into the tier, a FIFO would hang the copy);
- a downloaded index is validated exactly as a local one (`format.index.parse_index`) before
  any name in it is used, and only names it validated are joined to a path;
- downloads are capped: the index and each side file in bytes (FetchLimits), each data file at
  the size its index lists, the whole fetch in time; redirects stay on the source's scheme,
  host and port; an error says what was wrong (status, size, type) and never quotes what the
  server sent (the node may be pointed at a URL whose content the caller may not read).
Every failure of a source is a SourceError (the node answers it with a JSON 422; a fetch out of
time is a SourceTimeout, 504).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..format.convert import convert, resolve_source
from ..format.errors import CheckpointWriteError, FormatError
from ..format.index import Index, parse_index
from ..format.reader import is_checkpoint, is_engine_checkpoint, open_model_checkpoints
from ..format.spec import (
    DATA_FILE_PATTERN,
    ENGINE_RANK_DIR,
    FORMAT_NAME,
    INDEX_FILENAME,
    LAYOUT_ENGINE,
    LAYOUT_HF,
    align_up,
)
from ..format.writer import commit_directory, new_staging_dir
from .private import (
    NotRegular,
    copy_tree,
    create_private_file,
    make_tree_private,
    regular_tree,
    remove_tree,
    write_private_file,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("sllm_plugin.store")

# Files that make a checkpoint a complete model directory, tried beside a URL's index.
SIDE_FILE_NAMES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
#: Reserved beside a URL checkpoint's data files for its side files; what they really take is
#: counted when they have arrived (Tier.store), so a larger set still counts against capacity.
SIDE_FILES_ALLOWANCE = 1024 * 1024
_MIB = 1024 * 1024


@dataclass(frozen=True)
class FetchLimits:
    """What fetching one URL source may cost; a source past any of these is refused.

    `deadline_s` covers a whole download (every index, data file and side file), from the
    first request to the last byte, however slowly bytes arrive: per-read timeouts alone let a
    server dripping one byte at a time hold the tier's queue forever. `index_deadline_s` covers
    fetching the indexes when the source is resolved (inside the API call that registers the
    fetch). Side files are optional and small (config, tokenizer: the largest common one,
    gemma's tokenizer.json, is 34 MB).
    """

    deadline_s: float = 3600.0
    index_deadline_s: float = 60.0
    index_bytes: int = 64 * _MIB  # every index of the checkpoint together
    side_file_bytes: int = 64 * _MIB  # each
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # the longest wait for any one read
    max_redirects: int = 5
    max_ranks: int = 256  # tensor-parallel ranks of an engine checkpoint


DEFAULT_LIMITS = FetchLimits()


class SourceError(ValueError):
    """The source cannot be read as a model; the message says what was wrong."""


class SourceTimeout(SourceError):
    """A URL source did not deliver within its deadline."""

    status = 504


@dataclass
class Fetch:
    """A source resolved far enough to know its size, and how to write it."""

    nbytes: int
    write: Callable[[Path], None]  # writes the checkpoint at the given destination, atomically
    kind: str  # "checkpoint", "convert" or "url"


def resolve_fetch(source: str, revision: str | None = None,
                  limits: FetchLimits = DEFAULT_LIMITS) -> Fetch:
    """Find out what `source` is and how big its checkpoint will be. Raises SourceError."""
    if source.startswith(("http://", "https://")):
        return _url_fetch(source.rstrip("/"), limits)
    path = Path(source).expanduser()
    if path.is_dir() and (is_checkpoint(path) or is_engine_checkpoint(path)):
        nbytes = _checkpoint_files(path)
        _validate(path)
        return Fetch(nbytes, lambda dst: copy_checkpoint(path, dst), "checkpoint")
    return _convert_fetch(source, path, revision)


# -- local checkpoints ------------------------------------------------------------------------


def copy_checkpoint(src: Path, destination: Path) -> None:
    """Copy a checkpoint directory of either layout (validated first) to `destination`
    atomically: regular files only, opened without following links, private modes.

    Raises SourceError if `src` is not a valid checkpoint or holds anything else than regular
    files and directories; CheckpointWriteError if the destination's file system is full."""
    _checkpoint_files(src)
    _validate(src)
    staging = _private_staging(destination)
    try:
        try:
            copy_tree(src, staging)
        except NotRegular as e:
            raise _not_regular(src, e) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointWriteError(e.errno, f"no space left to write {destination} "
                                           f"({e.strerror})") from None
            raise
        _validate(staging)  # what landed is whole
        commit_directory(staging, destination, overwrite=False)
    except BaseException:
        remove_tree(staging)
        raise


def _checkpoint_files(path: Path) -> int:
    """Bytes of a local checkpoint source; SourceError if it holds links, FIFOs, devices."""
    try:
        return sum(regular_tree(path).values())
    except NotRegular as e:
        raise _not_regular(path, e) from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read the checkpoint ({e.strerror})") from None


def _not_regular(root: Path, e: NotRegular) -> SourceError:
    return SourceError(f"{root}: {e.relative} is {e.kind}; a checkpoint source may hold regular "
                       "files and directories only (links are not followed)")


def _validate(path: Path) -> None:
    """The checkpoint (either layout) is whole and valid, or SourceError says why."""
    try:
        open_model_checkpoints(path)
    except (FormatError, OSError, ValueError, RecursionError) as e:
        raise SourceError(f"not a valid sllm checkpoint: {e}") from None


def _private_staging(destination: Path) -> Path:
    staging = new_staging_dir(destination)
    os.chmod(staging, 0o700)
    return staging


# -- conversions --------------------------------------------------------------------------------


def _convert_fetch(source: str, path: Path, revision: str | None) -> Fetch:
    from ..format.safetensors_source import read_safetensors_header

    try:
        resolved = resolve_source(str(path) if path.exists() else source, revision)
    except (FileNotFoundError, FormatError) as e:
        raise SourceError(str(e)) from None
    except (OSError, ValueError, RecursionError) as e:
        raise SourceError(f"{source}: cannot be read as a model ({type(e).__name__}: {e})") \
            from None
    nbytes = 64 * 1024
    for side in resolved.side_files:  # regular files (links to them included), never opened
        with contextlib.suppress(OSError):
            nbytes += os.stat(side).st_size
    for weights in resolved.weight_files:
        try:
            mode = os.stat(weights).st_mode
            if not stat.S_ISREG(mode):  # a FIFO would hang this call, /dev/zero never end
                raise SourceError(f"{weights}: not a regular file; weights must be files")
            tensors, _ = read_safetensors_header(weights)
        except SourceError:
            raise
        except (FormatError, OSError, ValueError, TypeError, RecursionError) as e:
            detail = str(e) if isinstance(e, FormatError) else f"{type(e).__name__}: {e}"
            raise SourceError(f"not a valid safetensors model: {detail}") from None
        nbytes += sum(align_up(t.nbytes) for t in tensors)

    def write(dst: Path) -> None:
        try:
            convert(source if not path.exists() else path, dst, revision=revision, quiet=True)
        except CheckpointWriteError:
            raise
        except (ValueError, RecursionError) as e:  # FormatError included
            raise SourceError(f"{source}: conversion failed: {e}") from None
        make_tree_private(dst)

    return Fetch(nbytes, write, "convert")


# -- URLs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One checkpoint of a URL source: the whole of an `hf` one, or one rank of an engine one."""

    prefix: str  # "" or "rank-NNNNN/"
    raw_index: bytes
    index: Index


class _Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, url: str) -> None:
        if self.remaining() <= 0:
            raise SourceTimeout(f"{url}: {self.what} not finished within {self.seconds:g} s; "
                                "stopped")

    def timeout(self, limits: FetchLimits) -> httpx.Timeout:
        import httpx

        left = max(self.remaining(), 0.001)
        return httpx.Timeout(min(limits.read_timeout_s, left),
                             connect=min(limits.connect_timeout_s, left))


class _Origin:
    """The scheme, host and port a URL source lives on; its requests and redirects stay there."""

    def __init__(self, url: httpx.URL) -> None:
        self.key = self.of(url)

    @staticmethod
    def of(url: httpx.URL) -> tuple[str, str, int]:
        port = url.port or {"http": 80, "https": 443}.get(url.scheme, 0)
        return url.scheme, url.host, port

    def __str__(self) -> str:
        scheme, host, port = self.key
        return f"{scheme}://{host}:{port}"


def check_url_source(source: str) -> None:
    """Refuse a URL source that carries credentials (`user:password@host`), without quoting
    it: the source is kept in the registry and named in status, jobs and errors, which a
    secret must never be. Other sources pass."""
    if not source.startswith(("http://", "https://")):
        return
    netloc = source.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise SourceError("a URL source may not carry credentials (user:password@host): it "
                          "is kept and shown as it is; serve the checkpoint without them")


def _url_fetch(url: str, limits: FetchLimits) -> Fetch:
    import httpx

    check_url_source(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise SourceError("the source URL is not a valid URL") from None
    if not parsed.host or parsed.query or parsed.fragment:
        raise SourceError(f"{url}: a URL source is the URL of a checkpoint directory: a host, "
                          "a path, no query or fragment")
    origin = _Origin(parsed)
    deadline = _Deadline(limits.index_deadline_s, "fetching the index")
    with _client() as client:
        parts = _fetch_indexes(client, url, origin, limits, deadline)
    nbytes = sum(p.index.total_bytes + len(p.raw_index) for p in parts) + SIDE_FILES_ALLOWANCE

    def write(dst: Path) -> None:
        staging = _private_staging(dst)
        try:
            whole = _Deadline(limits.deadline_s, "the download")
            with _client() as client:
                for part in parts:
                    directory = staging
                    if part.prefix:
                        directory = _child(staging, part.prefix.rstrip("/"), _RANK_PATTERN)
                        os.mkdir(directory, 0o700)
                    for f in part.index.files:
                        target = _child(directory, f.name, DATA_FILE_PATTERN)
                        _download(client, f"{url}/{part.prefix}{f.name}", origin, limits, whole,
                                  target, limit=f.bytes, exact=True)
                    write_private_file(directory / INDEX_FILENAME, part.raw_index)
                for name in SIDE_FILE_NAMES:
                    _download(client, f"{url}/{name}", origin, limits, whole, staging / name,
                              limit=limits.side_file_bytes, optional=True)
            _validate(staging)
            commit_directory(staging, dst, overwrite=False)
        except BaseException:
            remove_tree(staging)
            raise

    return Fetch(nbytes, write, "url")


_RANK_PATTERN = re.compile(r"rank-\d{5}")


def _child(directory: Path, name: str, pattern: re.Pattern[str]) -> Path:
    """`directory / name`, for a name already validated; checked again here, so that no name
    from a server is ever joined to a path unless it is one plain, expected file name."""
    if not pattern.fullmatch(name) or "/" in name or name.startswith("."):
        raise SourceError(f"refusing the file name {name!r} from the source")
    return directory / name


def _client() -> httpx.Client:
    import httpx

    # Redirects are followed by hand (_open): httpx would read a redirect's whole body first,
    # and would follow it to any host. Identity encoding: the bytes counted are the bytes kept.
    return httpx.Client(follow_redirects=False, transport=httpx.HTTPTransport(retries=3),
                        headers={"Accept-Encoding": "identity"})


def _fetch_indexes(client: httpx.Client, url: str, origin: _Origin, limits: FetchLimits,
                   deadline: _Deadline) -> list[_Part]:
    """The checkpoint's index (an `hf` checkpoint) or every rank's (an `engine` one), each
    validated by parse_index, as for a local checkpoint, before any name in it is used."""
    budget = [limits.index_bytes]
    raw = _get(client, f"{url}/{INDEX_FILENAME}", origin, limits, deadline, budget)
    if raw is not None:
        index = _parse(raw, f"{url}/{INDEX_FILENAME}")
        if index.layout != LAYOUT_HF:
            raise SourceError(f"{url}/{INDEX_FILENAME} is the index of one rank of an engine "
                              "checkpoint; use the URL of the directory above its rank-NNNNN/")
        return [_Part("", raw, index)]
    parts: list[_Part] = []
    size = 1
    rank = 0
    while rank < size:
        prefix = ENGINE_RANK_DIR.format(rank=rank) + "/"
        where = f"{url}/{prefix}{INDEX_FILENAME}"
        raw = _get(client, where, origin, limits, deadline, budget)
        if raw is None:
            if rank == 0:
                raise SourceError(f"{url}: no {INDEX_FILENAME} there, nor {prefix}"
                                  f"{INDEX_FILENAME} (HTTP 404); a URL source must be an sllm "
                                  "checkpoint directory served over HTTP")
            raise SourceError(f"{where}: HTTP 404; the engine checkpoint has {size} ranks")
        index = _parse(raw, where)
        engine = index.engine
        if index.layout != LAYOUT_ENGINE or engine is None or engine.rank != rank:
            raise SourceError(f"{where}: not the index of rank {rank} of an engine checkpoint")
        if rank == 0:
            size = engine.tensor_parallel_size
            if size > limits.max_ranks:
                raise SourceError(f"{where}: {size} ranks, more than the {limits.max_ranks} "
                                  "a URL source may have")
        elif engine.model_copy(update={"rank": 0}) != parts[0].index.engine:
            raise SourceError(f"{where}: its engine section does not match rank 0's")
        parts.append(_Part(prefix, raw, index))
        rank += 1
    return parts


def _parse(raw: bytes, where: str) -> Index:
    """parse_index, with an error that says what kind of document it was, never what it held
    (the detail goes to the daemon's log, for its operator)."""
    try:
        return parse_index(raw, where)
    except (FormatError, ValueError, RecursionError) as e:
        detail = str(e)
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        kind = "is not JSON"
    else:
        claims = isinstance(document, dict) and document.get("format") == FORMAT_NAME
        kind = ("is an sllm index that fails validation (`sllm inspect` where it is served "
                "says why)" if claims else "is JSON, but not an sllm index")
    logger.warning("%s: invalid index: %s", where, detail)
    raise SourceError(f"{where} ({len(raw)} bytes) {kind}")


def _get(client: httpx.Client, url: str, origin: _Origin, limits: FetchLimits,
         deadline: _Deadline, budget: list[int]) -> bytes | None:
    """A small document (an index) in memory, within what is left of `budget`; None on 404."""
    chunks: list[bytes] = []
    got = _stream(client, url, origin, limits, deadline, chunks.append, limit=budget[0],
                  optional=True)
    if not got:
        return None
    raw = b"".join(chunks)
    budget[0] -= len(raw)
    return raw


def _download(client: httpx.Client, url: str, origin: _Origin, limits: FetchLimits,
              deadline: _Deadline, target: Path, limit: int, exact: bool = False,
              optional: bool = False) -> None:
    """Stream `url` into a new private file `target`: at most `limit` bytes (exactly that many
    if `exact`); an optional file the server does not have (404) is skipped."""
    fd = create_private_file(target)
    try:
        with os.fdopen(fd, "wb") as out:
            if not _stream(client, url, origin, limits, deadline, out.write, limit=limit,
                           exact=limit if exact else None, optional=optional):
                out.close()
                target.unlink()
                return
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(e.errno, f"no space left to write {target} "
                                       f"({e.strerror})") from None
        raise


def _stream(client: httpx.Client, url: str, origin: _Origin, limits: FetchLimits,
            deadline: _Deadline, sink: Callable[[bytes], object], limit: int,
            exact: int | None = None, optional: bool = False) -> bool:
    """GET `url` and feed its body to `sink`, stopping as soon as it passes `limit` bytes or
    the deadline. False for a 404 when `optional`; SourceError for anything else amiss."""
    import httpx

    try:
        with _open(client, url, origin, limits, deadline) as response:
            if optional and response.status_code == 404:
                return False
            if response.status_code != 200:
                raise SourceError(f"{url}: HTTP {response.status_code} ({_describe(response)})")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise SourceError(f"{url}: the server sent an encoded answer; serve the files "
                                  "as they are (no content encoding)")
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > limit:
                raise SourceError(f"{url}: {announced} bytes announced, more than the {limit} "
                                  f"allowed{_why(exact)}")
            received = 0
            for block in _blocks(response, url, deadline):
                received += len(block)
                if received > limit:
                    raise SourceError(f"{url}: more than {limit} bytes sent{_why(exact)}; "
                                      "stopped")
                sink(block)
    except httpx.HTTPError as e:
        deadline.check(url)  # a read timeout past the deadline is the deadline's
        raise SourceError(f"{url}: {_transport_error(e)}") from None
    if exact is not None and received != exact:
        raise SourceError(f"{url}: {received} bytes received, the index lists {exact}")
    return True


def _blocks(response: httpx.Response, url: str, deadline: _Deadline) -> Iterator[bytes]:
    for block in response.iter_raw():
        deadline.check(url)
        yield block


def _why(exact: int | None) -> str:
    return " (the size its index lists)" if exact is not None else ""


@contextlib.contextmanager
def _open(client: httpx.Client, url: str, origin: _Origin, limits: FetchLimits,
          deadline: _Deadline) -> Iterator[httpx.Response]:
    """A streamed response for `url`, redirects followed only within the source's origin and
    closed without reading their bodies."""
    deadline.check(url)
    request = client.build_request("GET", url, timeout=deadline.timeout(limits))
    for _ in range(limits.max_redirects + 1):
        response = client.send(request, stream=True)
        following = response.next_request
        if following is None:
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        if _Origin.of(following.url) != origin.key:
            raise SourceError(f"{url}: redirected to another scheme, host or port; a URL source "
                              f"may redirect only within {origin}")
        deadline.check(url)
        following.extensions["timeout"] = deadline.timeout(limits).as_dict()
        request = following
    raise SourceError(f"{url}: more than {limits.max_redirects} redirects")


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,40}/[A-Za-z0-9!#$&^_.+-]{1,60}")


def _describe(response: httpx.Response) -> str:
    """Status line details a caller may see: the media type and size, never the body."""
    media = response.headers.get("content-type", "").split(";")[0].strip()
    media = media if _MEDIA_TYPE.fullmatch(media) else ("no content type" if not media
                                                        else "an unusual content type")
    length = response.headers.get("content-length", "")
    size = f"{length} bytes" if length.isdigit() else "length not given"
    return f"{media}, {size}"


def _transport_error(e: httpx.HTTPError) -> str:
    """What went wrong on the wire, in our words: some httpx messages quote what the server
    sent (a malformed header line, a redirect's Location), which must not reach the caller."""
    import httpx

    if isinstance(e, httpx.TimeoutException):
        return f"timed out ({type(e).__name__})"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})"  # the OS's reason, e.g. connection refused
    if isinstance(e, httpx.RemoteProtocolError):
        return "the server broke the HTTP protocol"
    if isinstance(e, httpx.UnsupportedProtocol):
        return "not an http(s) URL"
    return f"the download failed ({type(e).__name__})"
