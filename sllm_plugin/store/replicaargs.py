"""Which vLLM flags a caller of the node's API may give a replica, and which argv values to hide.

A replica runs as the daemon's user with the daemon's devices, so the flags that reach it
through the API (`POST /replicas {"args"}`, `POST /models {"replica_args"}`) are hostile
input. They are checked against an allowlist of engine-tuning flags, each with the shape its
value must have: nothing that names a path or a module, imports or runs code, changes where
the replica listens or what it loads, or touches authentication (`--host`, `--model`,
`--trust-remote-code`, `--middleware`, `--api-key`, `--config`, `--ssl-*`, ... are refused,
as is every flag not listed, including vLLM's abbreviations of long flags). The operator's
flags (the configuration file's `replica_args` and its models' `replica_args`) are trusted,
and the daemon puts them, then its own, after the caller's: vLLM keeps the last value of a
flag, so the daemon's win.
"""

from __future__ import annotations

import re

_INT = re.compile(r"-?\d{1,12}")
_COUNT = re.compile(r"\d{1,12}(\.\d{1,6})?[kKmMgG]?")  # vLLM's human-readable integers
_LENGTH = re.compile(rf"{_COUNT.pattern}|auto|-1")
_FLOAT = re.compile(r"\d{1,6}(\.\d{1,9})?")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a method or dtype name


def has_flag(args: list[str], flag: str) -> bool:
    """Whether `flag` is given in `args`, as `--flag` or `--flag=VALUE`."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _choice(*names: str) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in names))


def _switch(name: str) -> dict[str, None]:
    return {f"--{name}": None, f"--no-{name}": None}


#: flag -> the pattern its value must match (None: a switch, which takes no value).
ALLOWED: dict[str, re.Pattern[str] | None] = {
    **_switch("enforce-eager"),
    **_switch("enable-prefix-caching"),
    **_switch("enable-chunked-prefill"),
    **_switch("async-scheduling"),
    **_switch("disable-sliding-window"),
    **_switch("disable-cascade-attn"),
    **_switch("disable-custom-all-reduce"),
    **_switch("enable-log-requests"),
    **_switch("disable-uvicorn-access-log"),
    "--disable-log-stats": None,
    "--max-model-len": _LENGTH,
    "--max-num-seqs": _INT,
    "--max-num-batched-tokens": _COUNT,
    "--max-logprobs": _INT,
    "--long-prefill-token-threshold": _INT,
    "--max-cudagraph-capture-size": _INT,
    "--stream-interval": _INT,
    "--num-gpu-blocks-override": _INT,
    "--block-size": _INT,
    "--seed": _INT,
    "--gpu-memory-utilization": _FLOAT,
    "--cpu-offload-gb": _FLOAT,
    "--kv-cache-memory-bytes": _COUNT,
    "--dtype": _choice("auto", "bfloat16", "float", "float16", "float32", "half"),
    "--kv-cache-dtype": _WORD,
    "--quantization": _WORD,
    "--scheduling-policy": _choice("fcfs", "priority"),
    "--logprobs-mode": _choice("processed_logits", "processed_logprobs", "raw_logits",
                               "raw_logprobs"),
    "--uvicorn-log-level": _choice("critical", "debug", "error", "info", "trace", "warning"),
}


class ReplicaArgsError(ValueError):
    """A flag (or its value) the API may not pass to a replica; the message names it."""


def check_api_args(args: list[str], where: str) -> list[str]:
    """`args` if every flag is on the allowlist with a value of the right shape, else
    ReplicaArgsError naming the first one that is not (and `where` it came from)."""
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag not in ALLOWED:
            shown = flag if flag.startswith("--") and len(flag) <= 64 else repr(arg[:64])
            raise ReplicaArgsError(
                f"{where}: {shown} may not be passed to a replica through the API (the node "
                "refuses flags that choose paths, code, addresses or credentials; the "
                "operator's configuration may set them). Allowed: " + ", ".join(ALLOWED))
        pattern = ALLOWED[flag]
        if pattern is None:
            if eq:
                raise ReplicaArgsError(f"{where}: {flag} takes no value")
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ReplicaArgsError(f"{where}: {flag} needs a value")
            value = args[i + 1]
            i += 1
        if not pattern.fullmatch(value):
            raise ReplicaArgsError(f"{where}: {flag} {value[:64]!r} is not a valid value")
        i += 1
    return args


_SECRET_FLAG = re.compile(r"--[\w-]*(key|token|secret|password|passwd|credentials?)",
                          re.IGNORECASE)


def redact(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` with the values of flags that may hold secrets (`--api-key`, `--hf-token`,
    anything named ...-key, ...-token, ...-secret, ...-password) replaced by `***`, and those
    values (to hide wherever the replica echoes them, such as vLLM's log of its arguments)."""
    shown, hidden = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if _SECRET_FLAG.fullmatch(flag):
            if eq:
                shown.append(f"{flag}=***")
                hidden.append(value)
            else:
                shown.append(flag)
                if i + 1 < len(argv):
                    shown.append("***")
                    hidden.append(argv[i + 1])
                    i += 1
        else:
            shown.append(arg)
        i += 1
    return shown, [h for h in hidden if len(h) >= 4]
