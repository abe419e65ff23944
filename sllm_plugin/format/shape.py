"""Engine shape: a key that says when two checkpoints can run in one vLLM engine (a weight swap).

Swapping weights into a running engine is only right when everything the engine built from the
first model also holds for the second: the architecture and every config field (layer count,
head sizes, rope settings, vocabulary...), the dtype and quantization, the tokenizer (vLLM keeps
the one it loaded), the chat template and the generation defaults. Two checkpoints whose shapes
differ must never share an engine: it would not fail, it would produce wrong tokens silently.

So the checkpoint shape keeps everything and drops only fields that are provably provenance
(`IDENTITY_FIELDS`: where a file came from, which library version wrote it). Any doubt keeps a
field: a needless difference costs a cold start, a wrong equality costs correctness.

The shape is computed at conversion and stored in the index metadata (`engine_shape`,
`engine_shape_version`), but recomputation from the files is authoritative: a stored value is
validated (an index is hostile input) and compared, never trusted over the files.

`engine_shape` adds what the engine itself adds: the vLLM version and the engine arguments that
shape memory and numerics (`ENGINE_ARG_FIELDS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FormatError
from .index import EngineInfo, Index, quote, read_index_file
from .safefs import open_regular, read_regular, real_directory
from .spec import ENGINE_RANK_DIR

SHAPE_VERSION = 1
METADATA_KEY = "engine_shape"
METADATA_VERSION_KEY = "engine_shape_version"

#: Removed from config.json and generation_config.json before hashing, and nothing else: which
#: path or hub id the file was loaded from, which hub commit, which transformers version wrote
#: it. None of them changes what a model computes.
IDENTITY_FIELDS = ("_name_or_path", "_commit_hash", "transformers_version")
#: Removed from tokenizer_config.json: `name_or_path` is provenance (transformers overwrites it
#: with the path it loads from); `chat_template` is hashed on its own (component "chat_template").
TOKENIZER_CONFIG_SKIP = ("name_or_path", "chat_template")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: Tokenizer files hashed by name (whichever exist), besides any *.model / *.tiktoken file.
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")
#: Chat template files (a template inside tokenizer_config.json is read from there).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

#: Engine arguments (vLLM EngineArgs names) that shape memory, numerics or the tokens served.
#: Arguments absent from the dict count as "not given" (None), distinct from an explicit
#: default: a needless difference, never a wrong equality. Anything else (ports, served names,
#: keys, load format) is ignored, so no secret ever enters the key.
ENGINE_ARG_FIELDS = (
    "max_model_len", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "dtype", "quantization", "kv_cache_dtype", "block_size", "max_num_seqs",
    "max_num_batched_tokens", "enable_chunked_prefill", "enforce_eager",
    "enable_prefix_caching", "gpu_memory_utilization", "kv_cache_memory_bytes",
    "num_gpu_blocks_override", "cpu_offload_gb", "enable_sleep_mode", "seed", "max_logprobs",
    "logprobs_mode", "tokenizer", "tokenizer_mode", "trust_remote_code", "hf_overrides",
    "override_generation_config", "generation_config", "compilation_config",
    "speculative_config", "enable_lora", "max_lora_rank", "max_loras",
    "disable_sliding_window", "attention_backend", "model_impl", "disable_cascade_attn",
)

_MAX_JSON = 16 * 1024 * 1024
_MAX_TOKENIZER_FILE = 1024 * 1024 * 1024
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Shape:
    """A checkpoint's shape: the digest, and the components it hashes (to explain a mismatch)."""

    version: int
    digest: str
    components: dict[str, Any]


def checkpoint_shape(checkpoint_dir: str | Path) -> Shape:
    """The shape of a checkpoint of either layout, computed from its files (authoritative).

    An `engine` layout directory holds the model files itself and its engine facts in
    rank-00000/; given one rank directory, the model files are those of the directory above.
    Raises FormatError naming the file for anything unreadable or malformed.
    """
    directory = Path(checkpoint_dir)
    rank0 = directory / ENGINE_RANK_DIR.format(rank=0)
    if rank0.is_dir():
        index, files = read_index_file(rank0), directory
    else:
        index = read_index_file(directory)
        files = directory.absolute().parent if index.engine is not None else directory
    return shape_of_files(files, {t.dtype for t in index.tensors}, index.engine)


def shape_of_files(directory: str | Path, dtypes: set[str] | frozenset[str],
                   engine: EngineInfo | None = None) -> Shape:
    """The shape of the model files in `directory` with tensors of `dtypes` (an `engine` layout
    checkpoint: its engine's dtype and quantization instead). Used by the converter on its
    staging directory, so the stored value is computed from exactly the files committed."""
    directory = Path(directory)
    root = real_directory(directory, "checkpoint directory")
    config = _json_file(directory / CONFIG, root, "model config")
    if config is not None:
        config = {k: v for k, v in config.items() if k not in IDENTITY_FIELDS}
    generation = _json_file(directory / GENERATION_CONFIG, root, "generation config")
    if generation is not None:
        generation = {k: v for k, v in generation.items() if k not in IDENTITY_FIELDS}
    tokenizer, template = _tokenizer(directory, root)
    if engine is not None:
        dtype, quantization = engine.dtype, engine.quantization
    else:
        dtype = ",".join(sorted(dtypes))
        qc = (config or {}).get("quantization_config")
        quantization = qc.get("quant_method") if isinstance(qc, dict) else None
    components = {
        "config": config,
        "dtype": dtype,
        "quantization": quantization,
        "tokenizer": tokenizer,
        "chat_template": template,
        "generation_config": generation,
    }
    return Shape(SHAPE_VERSION, _digest({"version": SHAPE_VERSION, **components}), components)


def shape_metadata(shape: Shape) -> dict[str, str]:
    """The index metadata entries that record `shape`."""
    return {METADATA_KEY: shape.digest, METADATA_VERSION_KEY: str(shape.version)}


def stored_shape(index: Index, where: str = "index") -> str | None:
    """The validated digest an index records, or None where it records none (an older
    checkpoint) or one of another shape version (not comparable). Raises FormatError for a
    malformed value: the metadata of an index is hostile input like the rest of it."""
    digest = index.metadata.get(METADATA_KEY)
    version = index.metadata.get(METADATA_VERSION_KEY)
    if digest is None and version is None:
        return None
    if digest is None or version is None:
        raise FormatError(f"{where}: metadata has only one of {METADATA_KEY!r} and "
                          f"{METADATA_VERSION_KEY!r}")
    if not (version.isascii() and version.isdigit() and len(version) <= 6):
        raise FormatError(f"{where}: metadata {METADATA_VERSION_KEY!r} is not a version number "
                          f"({quote(version)})")
    if not _is_digest(digest):
        raise FormatError(f"{where}: metadata {METADATA_KEY!r} is not a SHA-256 hex digest "
                          f"(64 lowercase hex characters; got {quote(digest)})")
    return digest if int(version) == SHAPE_VERSION else None


def explain_mismatch(a: Shape, b: Shape) -> list[str]:
    """Why two shapes differ, one line per differing component (empty when they are equal)."""
    if a.version != b.version:
        return [f"shape version {a.version} != {b.version}"]
    out: list[str] = []
    ca, cb = a.components, b.components
    out += _dict_diff("config", ca["config"], cb["config"])
    for key in ("dtype", "quantization"):
        if ca[key] != cb[key]:
            out.append(f"{key} {ca[key]} != {cb[key]}")
    if ca["tokenizer"] != cb["tokenizer"]:
        names = sorted(set(ca["tokenizer"]) | set(cb["tokenizer"]))
        which = [n for n in names if ca["tokenizer"].get(n) != cb["tokenizer"].get(n)]
        out.append(f"tokenizer files differ: {', '.join(which)}")
    if ca["chat_template"] != cb["chat_template"]:
        out.append("chat template differs")
    out += _dict_diff("generation_config", ca["generation_config"], cb["generation_config"])
    return out


def engine_shape(checkpoint_shape_digest: str, vllm_version: str,
                 engine_args: dict[str, Any]) -> str:
    """The engine key: a checkpoint shape digest, the vLLM version and the `ENGINE_ARG_FIELDS`
    of `engine_args` (vLLM EngineArgs names; `max-model-len` spelling accepted). Values must be
    JSON values. Two engines with equal keys can take each other's checkpoints."""
    if not _is_digest(checkpoint_shape_digest):
        raise ValueError(f"not a checkpoint shape digest: {quote(checkpoint_shape_digest)}")
    given = {str(k).replace("-", "_"): v for k, v in engine_args.items()}
    args = {name: given.get(name) for name in ENGINE_ARG_FIELDS}
    try:
        return _digest({"version": SHAPE_VERSION, "checkpoint": checkpoint_shape_digest,
                        "vllm": str(vllm_version), "args": args})
    except (TypeError, ValueError) as e:
        raise ValueError(f"engine arguments must be JSON values: {e}") from None


# -- internals -------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_digest(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def _json_file(path: Path, root: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file, or None where there is no such file."""
    if not os.path.lexists(path):
        return None
    text = read_regular(path, what, _MAX_JSON, root=root)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return value


def _file_sha256(path: Path, root: Path, what: str) -> str:
    fd = open_regular(path, what, root=root)
    h = hashlib.sha256()
    try:
        total = 0
        while block := os.read(fd, 16 * 1024 * 1024):
            total += len(block)
            if total > _MAX_TOKENIZER_FILE:
                raise FormatError(f"{path}: {what} is over {_MAX_TOKENIZER_FILE} bytes")
            h.update(block)
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return h.hexdigest()


def _tokenizer(directory: Path, root: Path) -> tuple[dict[str, str], str | None]:
    """SHA-256 of each tokenizer file (tokenizer_config.json canonical, less
    TOKENIZER_CONFIG_SKIP), and of the chat template(s) wherever they are kept."""
    try:
        names = sorted(e.name for e in os.scandir(directory))
    except OSError as e:
        raise FormatError(f"{directory}: cannot list the checkpoint: {e.strerror or e}") from None
    files: dict[str, str] = {}
    templates: dict[str, Any] = {}
    for name in names:
        path = directory / name
        if name == TOKENIZER_CONFIG:
            tc = _json_file(path, root, "tokenizer config") or {}
            if "chat_template" in tc:
                templates[name] = tc["chat_template"]
            files[name] = _digest({k: v for k, v in tc.items() if k not in TOKENIZER_CONFIG_SKIP})
        elif name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES):
            files[name] = _file_sha256(path, root, "tokenizer file")
        elif name in CHAT_TEMPLATE_FILES:
            templates[name] = _file_sha256(path, root, "chat template")
    return files, (_digest(templates) if templates else None)


def _dict_diff(what: str, a: dict | None, b: dict | None) -> list[str]:
    if a == b:
        return []
    if a is None or b is None:
        return [f"{what} {'absent' if a is None else 'present'} != "
                f"{'absent' if b is None else 'present'}"]
    out = []
    for key in sorted(set(a) | set(b)):
        name = key if len(key) <= 80 else key[:77] + "..."
        if key not in b:
            out.append(f"{what} field {name} only in the first")
        elif key not in a:
            out.append(f"{what} field {name} only in the second")
        elif a[key] != b[key]:
            out.append(f"{what} field {name}: {_short(a[key])} != {_short(b[key])}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
