"""Weight swaps into a running vLLM engine: `--worker-extension-cls` plus vLLM's in-place reload.

A started engine is kept and given another checkpoint of the same shape (same config, other
weights: two fine-tunes of one base), instead of a new process. Nothing in vLLM is patched:

- `--worker-extension-cls sllm_plugin.vllm.swap.SllmSwapExtension` makes vLLM add this class's
  methods to every worker (vllm/v1/worker/worker_base.py, `WorkerWrapperBase.init_worker`);
  they are called on all workers with `collective_rpc` (over HTTP: `POST /collective_rpc`,
  which exists with `VLLM_SERVER_DEV_MODE=1`; the replica guard lets it through only with the
  node's control key from the node's own host).
- `sllm_swap` streams the checkpoint from our loader (`iter_state_dict`, mapped and zero-copy
  when the files are cached, as a cold start) into `Worker.reload_weights`
  (vllm/v1/worker/gpu_worker.py; `GPUModelRunner.reload_weights`, inherited by the CPU runner),
  which runs vLLM's layerwise in-place reload (vllm/model_executor/model_loader/reload/): each
  layer is restored to its checkpoint form, loaded through the model's own `load_weights`,
  post-processed again (on CPU: the oneDNN/SGL repacked linear weights) and copied back into
  the original tensors (so CUDA graphs keep pointing at valid memory). The runner then resets
  its LoRA, encoder and multimodal caches.

The prefix (KV) cache is the engine core's, not the worker's: the caller pauses the engine with
`POST /pause?mode=abort` (which also resets the prefix, encoder and multimodal caches) before
the swap and checks `POST /reset_prefix_cache` answers `{"success": true}` after it, then
`POST /resume`. docs/FAST_START.md has the whole sequence and why each step is there.

What can be swapped is checked here before the model is touched, so a refusal leaves the old
weights serving: only hf-layout checkpoints, with exactly the tensor names, shapes and dtypes of
the checkpoint the engine holds now, and the same checkpoint shape (`format.shape`: config,
tokenizer, chat template, generation defaults, dtype; the node compares the engine key too).
A failure after loading began leaves a half-loaded model: the extension then refuses every
later swap and says so (`broken`) in its answer and in `sllm_swap_state`, and the node must
stop the replica (never resume it). Errors are answers, not exceptions (see `sllm_swap`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..format.reader import Checkpoint, is_checkpoint, open_checkpoint
from ..format.shape import checkpoint_shape, explain_mismatch
from ..format.spec import LAYOUT_HF
from ..loader.api import LoadStats, iter_state_dict

logger = logging.getLogger("vllm.sllm_plugin")

#: Tier names a swap may report (the node store's, and "disk" for a path outside it).
TIERS = frozenset({"dram", "ssd", "disk"})

Signature = dict[str, tuple[str, tuple[int, ...]]]


class SwapError(RuntimeError):
    """A swap refused (nothing was touched) or failed (the engine must be stopped)."""


def tensor_signature(ckpt: Checkpoint) -> Signature:
    """Name -> (dtype, shape) of every tensor and alias: what must match for a swap."""
    sig: Signature = {t.name: (t.dtype, tuple(t.shape)) for t in ckpt.index.tensors}
    for alias, target in ckpt.index.aliases.items():
        sig[alias] = sig[target]
    return sig


def check_swappable(current: Checkpoint, new: Checkpoint) -> None:
    """Raise SwapError naming the first difference that makes `new` unfit for this engine."""
    if new.index.layout != LAYOUT_HF:
        raise SwapError(f"{new.directory}: a {new.index.layout!r}-layout checkpoint cannot be "
                        "swapped in yet (only 'hf' layout: its tensors go through vLLM's "
                        "in-place reload); cold-start it instead")
    have, want = tensor_signature(current), tensor_signature(new)
    if have != want:
        missing = sorted(set(have) - set(want))
        extra = sorted(set(want) - set(have))
        differ = sorted(n for n in set(have) & set(want) if have[n] != want[n])
        parts = [f"{what}: {names[:5]}" for what, names in
                 (("missing", missing), ("not in this engine", extra),
                  ("other dtype or shape", differ)) if names]
        raise SwapError(f"{new.directory}: tensors do not match the checkpoint this engine "
                        f"holds ({current.directory}): " + "; ".join(parts))
    a, b = checkpoint_shape(current.directory), checkpoint_shape(new.directory)
    if a.digest != b.digest:
        why = explain_mismatch(a, b)
        raise SwapError(f"{new.directory}: its engine shape differs from the engine's "
                        f"({current.directory}): " + "; ".join(why[:4]))


class SllmSwapExtension:
    """Mixed into vLLM's worker class by `--worker-extension-cls`; `self` is the worker.

    Attribute names all start with `sllm_` / `_sllm_`: vLLM refuses an extension whose names
    collide with the worker's own.
    """

    _sllm_current: str | None = None
    _sllm_broken: str | None = None
    _sllm_swaps: int = 0

    def sllm_swap(self, path: str, tier: str | None = None) -> dict[str, Any]:
        """Load the hf-layout sllm checkpoint at `path` into the running model, in place.

        Never raises: an exception from a `collective_rpc` method comes out of vLLM's
        `/collective_rpc` endpoint as an unhandled ASGI error (a 500, and the connection is
        dropped). Returns `{"ok": true, ...timings}`, or `{"ok": false, "error": ...,
        "broken": null}` for a refusal (nothing was touched: the old weights still serve), or
        `{"ok": false, "error": ..., "broken": ...}` when the load failed halfway (the engine
        holds partial weights and must be stopped).
        """
        try:
            return {"ok": True, **self._sllm_swap(path, tier)}
        except Exception as e:  # reported to the caller, who decides; see the docstring
            logger.warning("sllm: swap to %s did not happen: %s", path, e)
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "broken": self._sllm_broken}

    def _sllm_swap(self, path: str, tier: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        if self._sllm_broken is not None:
            raise SwapError(f"this engine holds partial weights since a failed swap "
                            f"({self._sllm_broken}); stop it")
        if not isinstance(path, str) or not path:
            raise SwapError("sllm_swap needs the checkpoint directory as a string")
        if tier is not None and tier not in TIERS:
            raise SwapError(f"unknown tier {tier!r} (one of {sorted(TIERS)})")
        new = open_checkpoint(path)  # validates the index and every data file (stat only)
        current = open_checkpoint(self._sllm_current_path())
        check_swappable(current, new)
        opts = self._sllm_options()
        stats = LoadStats()
        weights = iter_state_dict(new.directory, "cpu", threads=opts.threads,
                                  direct_io=opts.direct_io, verify=opts.verify,
                                  chunk_bytes=opts.chunk_size, stats=stats, zero_copy=True)
        # The first tensor is read before the model is dismantled: a checkpoint that cannot
        # even start loading (unreadable file, bad first chunk) is still a clean refusal.
        try:
            first = next(weights)
        except StopIteration:
            raise SwapError(f"{new.directory}: the checkpoint has no tensors") from None
        validated = time.perf_counter()
        expected = set(tensor_signature(new))
        counted = _Counted(itertools.chain([first], weights))
        try:
            self.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
            if counted.names != expected:
                raise SwapError(f"{new.directory}: the load delivered {len(counted.names)} of "
                                f"{len(expected)} tensors")
        except BaseException as e:
            self._sllm_broken = f"{path}: {type(e).__name__}: {e}"
            logger.error("sllm: swap to %s failed during the load; the engine holds partial "
                         "weights and must be stopped", path)
            raise
        finally:
            weights.close()
        loaded = time.perf_counter()
        self._sllm_current = str(new.directory)
        self._sllm_swaps += 1
        result = {
            "path": str(new.directory), "tier": tier or _tier_of(new.directory),
            "bytes": stats.bytes, "tensors": len(counted.names),
            "validate_s": round(validated - started, 6),
            "load_s": round(loaded - validated, 6),
            "total_s": round(loaded - started, 6),
            "swaps": self._sllm_swaps,
        }
        logger.info("sllm: swapped in %s: %.4f GB in %.4f s (validate %.4f s, load and "
                    "post-process %.4f s), tier %s", result["path"], stats.bytes / 1e9,
                    result["total_s"], result["validate_s"], result["load_s"], result["tier"])
        return result

    def sllm_swap_state(self) -> dict[str, Any]:
        """Which checkpoint this worker holds, how many swaps it took, whether it is broken."""
        return {"path": self._sllm_current_path(), "swaps": self._sllm_swaps,
                "broken": self._sllm_broken}

    # -- internals ----------------------------------------------------------------------

    def _sllm_current_path(self) -> str:
        if self._sllm_current is not None:
            return self._sllm_current
        model_config = self.vllm_config.model_config  # type: ignore[attr-defined]
        model = str(model_config.model_weights or model_config.model)
        if not is_checkpoint(model):
            raise SwapError(f"this engine was not started from an hf-layout sllm checkpoint "
                            f"({model}); start standby engines with --load-format sllm on a "
                            "converted checkpoint")
        return model

    def _sllm_options(self):
        from .options import LoaderOptions

        load_config = self.vllm_config.load_config  # type: ignore[attr-defined]
        return LoaderOptions.parse(load_config.model_loader_extra_config)


class _Counted:
    """Passes (name, tensor) pairs through and remembers every name that went by."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._it = it
        self.names: set[str] = set()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._it:
            self.names.add(name)
            yield name, tensor


def _tier_of(path: Path) -> str:
    return "dram" if str(path.resolve()).startswith("/dev/shm/") else "disk"
